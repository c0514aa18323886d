"""Training input from shards against the folder tree, same images, same run: images/s through
the loader (read, decode, two augmented views, collate into class-balanced micro-batches).

Folder: ``MultiViewDataset`` + ``ClassBalancedBatchSampler`` reading one file per image. Shards:
``ascension shard`` output (written once, not timed) read by ``ShardTrainStream``, the tar read
front to back. Each is timed over the same number of micro-batches with ``--workers`` loader
processes (0: in the timing process), best of ``--rounds``.

    python benchmarks/bench_shards.py            # ../shared/data/sign-language-digits, 2 workers
    python benchmarks/bench_shards.py --quick    # 512 images, 1 round
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import SHARED_DATA, benchmark_parser, print_table, write_json
from torch.utils.data import DataLoader

from ascension_cli.data.augment import train_transform
from ascension_cli.data.dataset import MultiViewDataset, collate, min_decode_side
from ascension_cli.data.folder import scan_folder
from ascension_cli.data.sampler import ClassBalancedBatchSampler
from ascension_cli.data.shards import open_shards, write_shards
from ascension_cli.data.stream import ShardTrainStream

MEAN = STD = (0.5, 0.5, 0.5)


def folder_loader(scan, size, batch, steps, per_step, workers):
    dataset = MultiViewDataset(scan.paths, scan.labels,
                               train_transform("color-agnostic", size, MEAN, STD), 2,
                               min_side=min_decode_side(size))
    sampler = ClassBalancedBatchSampler(scan.labels, batch * per_step, batch, 4, seed=0)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)


def shard_loader(shards, size, batch, steps, per_step, workers):
    stream = ShardTrainStream(shards, train_transform("color-agnostic", size, MEAN, STD), 2,
                              batch, per_step, 4, steps, 2048, 0, min_side=min_decode_side(size))
    return DataLoader(stream, batch_size=None, num_workers=workers)


def images_per_second(loader, micro_batches: int, rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        started, images = time.perf_counter(), 0
        for position, batch in enumerate(loader, start=1):
            images += len(batch)
            if position == micro_batches:
                break
        best = max(best, images / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = benchmark_parser(__doc__, __file__)
    parser.add_argument("--root", type=Path, default=SHARED_DATA / "sign-language-digits")
    parser.add_argument("--images", type=int, help="images used (default: all; --quick 512)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="timed rounds (default 2; --quick 1)")
    args = parser.parse_args()
    scan = scan_folder(args.root)
    count = args.images or (512 if args.quick else len(scan))
    keep = np.sort(np.random.default_rng(0).choice(len(scan), min(count, len(scan)), False))
    scan = scan.subset(np.isin(np.arange(len(scan)), keep))
    rounds = args.rounds or (1 if args.quick else 2)
    batch, per_step = 32, 4
    steps = max(1, len(scan) // (batch * per_step))
    micro_batches = steps * per_step

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as folder:
        started = time.perf_counter()
        sidecar = write_shards(scan, folder, shard_bytes=max(1, sum(
            p.stat().st_size for p in scan.paths) // 8 + 1))
        write_seconds = time.perf_counter() - started
        shards = open_shards(folder)
        workers = min(args.workers, len(shards.urls))
        folder_speed = images_per_second(
            folder_loader(scan, args.size, batch, steps, per_step, workers), micro_batches,
            rounds)
        shard_speed = images_per_second(
            shard_loader(shards, args.size, batch, steps, per_step, workers), micro_batches,
            rounds)
    rows = [["folder tree (baseline)", f"{folder_speed:.0f}", "1.00"],
            ["shards", f"{shard_speed:.0f}", f"{shard_speed / folder_speed:.2f}"]]
    print_table(f"training input, {len(scan)} images of {args.root.name} at {args.size} px, "
                f"{workers} worker(s), 2 views; {len(sidecar['shards'])} shards written in "
                f"{write_seconds:.1f} s", ["source", "images/s", "ratio"], rows)
    write_json("bench_shards", {
        "images": len(scan), "size": args.size, "workers": workers,
        "shards": len(sidecar["shards"]), "write_seconds": write_seconds,
        "folder_images_per_second": folder_speed, "shard_images_per_second": shard_speed,
        "shards_vs_folder": shard_speed / folder_speed,
    }, args.json)


if __name__ == "__main__":
    main()
