"""Decode + augment throughput of one worker: our pipeline vs torchvision, same files, one run.

Ours: OpenCV decoding (EXIF, 16-bit, alpha handled) + the Albumentations colour-agnostic views.
Baseline: torchvision ImageFolder (PIL) + transforms.v2 with the equivalent operations. Both
produce two normalised float views per image at the same size.

    python benchmarks/bench_data.py --quick   # 200 images of ../shared/data/sign-language-digits
    python benchmarks/bench_data.py           # 1000 images
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import SHARED_DATA, print_table, write_json

from ascension_cli.data.augment import train_transform
from ascension_cli.data.dataset import MultiViewDataset
from ascension_cli.data.folder import scan_folder


def sample_paths(root, count, seed=0):
    scan = scan_folder(root)
    chosen = np.random.default_rng(seed).choice(len(scan), min(count, len(scan)), replace=False)
    return [scan.paths[i] for i in np.sort(chosen)], scan.labels[np.sort(chosen)]


def ours(paths, labels, size, views):
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    dataset = MultiViewDataset(paths, labels, train_transform("color-agnostic", size, mean, std),
                               views)
    for index in range(len(dataset)):
        item = dataset[(index, index)]
        assert item[0].shape == (views, 3, size, size)


def torchvision_pipeline(paths, labels, size, views):
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomAffine(degrees=12, shear=6, scale=(0.9, 1.1))], p=0.3),
        v2.RandomChoice([v2.Grayscale(3), v2.RandomChannelPermutation(),
                         v2.ColorJitter(0.4, 0.4, 0.8, 0.5)]),
        v2.RandomApply([v2.GaussianBlur(5)], p=0.3),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5] * 3, [0.5] * 3),
    ])
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            stacked = torch.stack([transform(image) for _ in range(views)])
        assert stacked.shape == (views, 3, size, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--root", default=str(SHARED_DATA / "sign-language-digits"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--views", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one worker's throughput
    paths, labels = sample_paths(args.root, 200 if args.quick else 1000)
    results = {}
    for name, pipeline in (("ascension (OpenCV + Albumentations)", ours),
                           ("torchvision ImageFolder + v2", torchvision_pipeline)):
        pipeline(paths[:10], labels[:10], args.size, args.views)  # warm-up
        best = None
        for _ in range(2):
            started = time.perf_counter()
            pipeline(paths, labels, args.size, args.views)
            seconds = time.perf_counter() - started
            best = seconds if best is None else min(best, seconds)
        results[name] = {"seconds": best, "images_per_second": len(paths) / best}
    names = list(results)
    ratio = results[names[0]]["images_per_second"] / results[names[1]]["images_per_second"]
    print_table(f"decode + {args.views} augmented views at {args.size} px, one worker, "
                f"{len(paths)} images of {args.root}",
                ["pipeline", "images/s"],
                [[n, f"{r['images_per_second']:.1f}"] for n, r in results.items()])
    print(f"ours vs torchvision: {ratio:.2f}x (goal >= 1.0x)")

    # Photos far larger than the input: libjpeg's reduced-scale decoding vs a full decode.
    from ascension_cli.data.folder import header_size, load_image

    scan = scan_folder(args.root)
    large = []
    for path in scan.paths:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            with open(path, "rb") as handle:
                size = header_size(handle.read(1 << 16))
            if size is not None and min(size) >= 4 * args.size:
                large.append(path)
    reduced = {}
    if large:
        for label, min_side in (("full decode", None), ("reduced decode", 2 * args.size)):
            started = time.perf_counter()
            for _ in range(3):
                shapes = {load_image(path, min_side=min_side).shape for path in large}
            seconds = (time.perf_counter() - started) / (3 * len(large))
            reduced[label] = {"seconds_per_image": seconds,
                              "decoded_shapes": sorted(str(s) for s in shapes)}
        speedup = (reduced["full decode"]["seconds_per_image"]
                   / reduced["reduced decode"]["seconds_per_image"])
        print_table(f"{len(large)} JPEGs with a short side >= 4 x {args.size} px",
                    ["decode", "ms/image", "shape"],
                    [[k, f"{v['seconds_per_image'] * 1000:.1f}", ", ".join(v["decoded_shapes"])]
                     for k, v in reduced.items()])
        print(f"reduced-scale decoding: {speedup:.2f}x faster")
        reduced["speedup"] = speedup
    write_json("bench_data", {"quick": args.quick, "size": args.size, "views": args.views,
                              "images": len(paths), "results": results,
                              "ours_vs_torchvision": ratio, "large_jpegs": reduced})


if __name__ == "__main__":
    main()
