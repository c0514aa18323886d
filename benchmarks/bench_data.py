"""Decode + augment throughput of one worker: our pipeline vs torchvision, same files, one run.

Ours: OpenCV decoding (EXIF, 16-bit, alpha handled) + the Albumentations colour-agnostic views.
Baseline: torchvision ImageFolder (PIL) + transforms.v2 with the equivalent operations. Both
produce two normalised float views per image at the same size. Also ours reading the images
from ``--cache-images`` memory instead of decoding them.

    python benchmarks/bench_data.py --quick   # 200 images of ../shared/data/sign-language-digits
    python benchmarks/bench_data.py           # 1000 images
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
from _common import SHARED_DATA, benchmark_parser, best_of_rounds, print_table, write_json

from ascension_cli.data.augment import train_transform
from ascension_cli.data.cache import DecodedImages
from ascension_cli.data.dataset import MultiViewDataset, min_decode_side
from ascension_cli.data.folder import scan_folder


def sample_paths(root, count, seed=0):
    scan = scan_folder(root)
    chosen = np.random.default_rng(seed).choice(len(scan), min(count, len(scan)), replace=False)
    return [scan.paths[i] for i in np.sort(chosen)], scan.labels[np.sort(chosen)]


def ours(paths, labels, size, views, cache=None):
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    dataset = MultiViewDataset(paths, labels, train_transform("color-agnostic", size, mean, std),
                               views, min_side=min_decode_side(size), cache=cache)
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
    parser = benchmark_parser(__doc__, __file__)
    parser.add_argument("--root", default=str(SHARED_DATA / "sign-language-digits"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--views", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one worker's throughput
    paths, labels = sample_paths(args.root, 200 if args.quick else 1000)
    # --cache-images: decoded once (timed apart), then every epoch reads memory.
    started = time.perf_counter()
    cache = DecodedImages.build(paths, keep_side=2 * args.size, threads=1)
    cache_seconds = time.perf_counter() - started
    pipelines = {
        "ascension (OpenCV + Albumentations)": partial(ours, paths, labels, args.size, args.views),
        "torchvision ImageFolder + v2": partial(torchvision_pipeline, paths, labels, args.size,
                                                args.views),
        "ascension, --cache-images": partial(ours, paths, labels, args.size, args.views, cache),
    }
    # Interleaved rounds: every pipeline sees the same drift of machine speed.
    best = best_of_rounds(pipelines, rounds=3)
    results = {name: {"seconds": seconds, "images_per_second": len(paths) / seconds}
               for name, seconds in best.items()}
    names = list(results)
    ratio = results[names[0]]["images_per_second"] / results[names[1]]["images_per_second"]
    print_table(f"decode + {args.views} augmented views at {args.size} px, one worker, "
                f"{len(paths)} images of {args.root}",
                ["pipeline", "images/s"],
                [[n, f"{r['images_per_second']:.1f}"] for n, r in results.items()])
    print(f"ours vs torchvision: {ratio:.2f}x (goal >= 1.0x)")
    cached_ratio = (results[names[2]]["images_per_second"]
                    / results[names[0]]["images_per_second"])
    print(f"--cache-images vs decoding every epoch: {cached_ratio:.2f}x; building the cache took "
          f"{cache_seconds:.2f} s on one thread for {cache.nbytes / 2**20:.1f} MiB")

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
        # The whole sample (decode + views) of these photos, decoded each time or cached.
        large_labels = np.zeros(len(large), np.int64)
        large_cache = DecodedImages.build(large, keep_side=2 * args.size, threads=1)
        per_sample = best_of_rounds({
            "decoded each epoch": partial(ours, large, large_labels, args.size, args.views),
            "--cache-images": partial(ours, large, large_labels, args.size, args.views,
                                      large_cache),
        }, rounds=3)
        per_sample = {k: v / len(large) for k, v in per_sample.items()}
        reduced["sample_seconds"] = per_sample
        reduced["cache_speedup"] = per_sample["decoded each epoch"] / per_sample["--cache-images"]
        print(f"decode + {args.views} views of these photos: "
              f"{per_sample['decoded each epoch'] * 1000:.1f} ms decoded each epoch, "
              f"{per_sample['--cache-images'] * 1000:.1f} ms from --cache-images "
              f"({reduced['cache_speedup']:.1f}x)")
    write_json("bench_data", {"quick": args.quick, "size": args.size, "views": args.views,
                              "images": len(paths), "results": results,
                              "ours_vs_torchvision": ratio, "large_jpegs": reduced,
                              "cache": {"speedup": cached_ratio, "build_seconds": cache_seconds,
                                        "mib": cache.nbytes / 2**20}}, path=args.json)


if __name__ == "__main__":
    main()
