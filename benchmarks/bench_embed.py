"""Embedding throughput: Ascension's embed pipeline vs a minimal hand-written timm loop, one run.

Both run the same model, precision and images at the same batch size; ours is measured with its
defaults, with a data worker per core, and channels-first (NCHW); the hand-written loop is what a
user would write: read with
OpenCV, resize the short side to size / crop_pct (timm's eval recipe), centre-crop, normalise,
batch, forward under inference_mode.

    python benchmarks/bench_embed.py --quick   # tf_efficientnet_lite0, 128 px, 256 images
    python benchmarks/bench_embed.py           # 224 px, 1024 images
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from _common import SHARED_DATA, benchmark_parser, best_of_rounds, print_table, write_json

from ascension_cli.data.folder import scan_folder
from ascension_cli.embedding.pipeline import embed_images
from ascension_cli.model.backbone import build_model
from ascension_cli.runtime import (
    autocast_factory,
    resolve_device,
    resolve_precision,
    resolve_workers,
    use_channels_last,
)


def hand_written(model, paths, size, batch_size, device, autocast, mean, std, crop_pct):
    mean = np.array(mean, np.float32) * 255
    std = np.array(std, np.float32) * 255
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = []
            for path in paths[start : start + batch_size]:
                image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
                # timm's eval recipe: short side to size / crop_pct, then a centre crop.
                scale = round(size / crop_pct) / min(image.shape[:2])
                image = cv2.resize(image, (max(size, round(image.shape[1] * scale)),
                                           max(size, round(image.shape[0] * scale))),
                                   interpolation=cv2.INTER_AREA)
                top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
                crop = image[top : top + size, left : left + size].astype(np.float32)
                batch.append(((crop - mean) / std).transpose(2, 0, 1))
            tensor = torch.from_numpy(np.stack(batch)).to(device)
            with autocast():
                features = model.backbone(tensor)
            outputs.append(torch.nn.functional.normalize(features.float(), dim=1).cpu())
    return torch.cat(outputs).numpy()


def main() -> None:
    parser = benchmark_parser(__doc__, __file__)
    parser.add_argument("--root", default=str(SHARED_DATA / "sign-language-digits"))
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size, count = (128, 256) if args.quick else (224, 1024)
    scan = scan_folder(args.root)
    paths = scan.paths[:: max(1, len(scan) // count)][:count]

    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    autocast = autocast_factory(precision, device)
    # Real weights where we have them: a random network's activations are garbage whose values
    # change the speed of the CPU kernels, which would make the comparison about the data.
    weights = SHARED_DATA.parent / "weights" / f"{args.model}.safetensors"
    model, spec = build_model(args.model, pretrained=weights.is_file(),
                              weights=weights if weights.is_file() else None, image_size=size)
    model.to(device).eval()
    default_workers = resolve_workers(None, device)
    cores = os.cpu_count() or 1

    def ours(**options):
        return lambda: embed_images(model, spec, paths, None, batch_size=args.batch_size,
                                    device=str(device), precision=precision, **options)[0]

    runs = {
        f"ascension embed, defaults ({default_workers} workers, channels-last)":
            ours(workers=None),
        f"ascension embed, {cores} workers (one per core)": ours(workers=cores),
        f"ascension embed, {default_workers} workers, --no-channels-last":
            ours(workers=None, channels_last=False),
        "hand-written timm loop": lambda: hand_written(
            use_channels_last(model, False), paths, size, args.batch_size, device, autocast,
            spec.mean, spec.std, spec.crop_pct),
    }
    vectors = {name: run() for name, run in runs.items()}  # also the warm-up
    # Rounds that run every pipeline once in turn: all see the same drift of machine speed.
    best = best_of_rounds(runs, args.rounds)
    results = {name: {"seconds": seconds, "images_per_second": len(paths) / seconds}
               for name, seconds in best.items()}
    names = list(runs)
    ours_default, ours_per_core, ours_nchw, theirs = (results[n]["images_per_second"]
                                                      for n in names)
    agreement = float(np.mean(np.sum(vectors[names[0]] * vectors[names[-1]], axis=1)))
    print_table(f"{args.model} at {size} px, {precision}, batch {args.batch_size}, "
                f"{len(paths)} images", ["pipeline", "images/s"],
                [[n, f"{r['images_per_second']:.1f}"] for n, r in results.items()])
    print(f"ours vs hand-written: {ours_default / theirs:.2f}x with its defaults (goal >= 0.95x), "
          f"{ours_per_core / theirs:.2f}x with a worker per core; mean cosine between their "
          f"vectors: {agreement:.4f}")
    print(f"channels-last vs NCHW: {ours_default / ours_nchw:.2f}x")
    write_json("bench_embed", {"quick": args.quick, "model": args.model, "image_size": size,
                               "precision": precision, "images": len(paths),
                               "default_workers": default_workers, "results": results,
                               "ours_vs_hand_written": ours_default / theirs,
                               "ours_worker_per_core_vs_hand_written": ours_per_core / theirs,
                               "channels_last_vs_nchw": ours_default / ours_nchw,
                               "mean_cosine_between_outputs": agreement}, path=args.json)


if __name__ == "__main__":
    main()
