"""The loaders of a training run: the training images through the class-balanced sampler (or a
shard stream), the validation images, the optional decoded-image cache, and what happens to an
unreadable file (reported once, left out of later epochs)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ascension_cli.config import TrainConfig
from ascension_cli.data.augment import train_transform
from ascension_cli.data.cache import DecodedImages, memory_share
from ascension_cli.data.dataset import (
    Failed,
    MultiViewDataset,
    collate,
    eval_photos,
    min_decode_side,
)
from ascension_cli.data.sampler import ClassBalancedBatchSampler, steps_per_epoch
from ascension_cli.data.splits import TrainData
from ascension_cli.data.stream import ShardTrainStream, stream_count
from ascension_cli.errors import Wording
from ascension_cli.model.backbone import ModelSpec
from ascension_cli.train.reporter import Reporter
from ascension_cli.train.stopping import StopRequest, ignore_sigint
from ascension_cli.train.validation import gallery_sample
from ascension_cli.values import whole


@dataclass(frozen=True)
class Loaders:
    sampler: Any  # ClassBalancedBatchSampler, or ShardTrainStream for shards
    train: DataLoader
    val: DataLoader | None
    train_failures: Callable[[Failed], None]
    val_failures: Callable[[Failed], None]
    gallery: DataLoader | None = None  # training photos the validation photos are searched
    # among, for the starting weights and best.pt (--gallery-check; folders only)
    gallery_failures: Callable[[Failed], None] | None = None


class _LoadFailures:
    """Reports each unreadable file once and keeps it out of later epochs."""

    def __init__(self, reporter: Reporter, sampler: ClassBalancedBatchSampler | None):
        self.reporter = reporter
        self.sampler = sampler
        self.seen: set[int] = set()

    def __call__(self, failure: Failed) -> None:
        if failure.index in self.seen:
            return
        self.seen.add(failure.index)
        if self.sampler is not None:
            self.sampler.exclude([failure.index])
        self.reporter.message(f"skipped unreadable image: {failure.reason}")


class Exclusions:
    """The files a sampler leaves out, as a checkpoint keeps them (a sorted list)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def state_dict(self) -> list[int]:
        return sorted(self.sampler.excluded)

    def load_state_dict(self, excluded: list[int]) -> None:
        size = len(getattr(self.sampler, "labels", ())) or math.inf
        if not isinstance(excluded, list) or not all(whole(i, 0, size - 1) for i in excluded):
            raise ValueError("not a list of the training set's image numbers")
        self.sampler.exclude(excluded)


def _loader_options(config: TrainConfig, machine) -> dict[str, Any]:
    options: dict[str, Any] = {
        "num_workers": machine.workers, "collate_fn": collate,
        "pin_memory": machine.device.type == "cuda",
        # A private generator: the loader must not draw from the global RNG, or a resumed run
        # (fresh iterator) and an uninterrupted one (persistent workers) would diverge.
        "generator": torch.Generator().manual_seed(config.seed),
    }
    if machine.workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=ignore_sigint)
    return options


def build_loaders(config: TrainConfig, data: TrainData, spec: ModelSpec, machine,
             reporter: Reporter, stop: StopRequest) -> Loaders:
    if data.shards is not None:
        return _stream_loaders(config, data, spec, machine, reporter)
    train_paths = [data.scan.paths[i] for i in data.train_index]
    # Large photos are decoded (and cached) at reduced scale, keeping twice the input size for
    # the crops.
    keep_side = min_decode_side(spec.image_size)
    train_cache = val_cache = None
    if config.cache_images:
        train_cache, val_cache = _cache_images([train_paths, data.val_paths], keep_side,
                                               config.max_image_pixels, reporter, stop)
    train_set = MultiViewDataset(
        train_paths, data.train_labels,
        train_transform(config.augment, spec.image_size, spec.mean, spec.std), config.views,
        config.max_image_pixels, min_side=keep_side, cache=train_cache,
    )
    distributed = machine.distributed
    sampler = ClassBalancedBatchSampler(
        data.train_labels, config.target_batch, config.batch_size, config.samples_per_class,
        seed=config.seed, mix_micro_batches=config.accumulation == "cache",
        rank=distributed.rank, world_size=distributed.world_size,
    )
    options = _loader_options(config, machine)
    # Under DDP every rank must draw the same batches, so a rank cannot exclude a file alone:
    # unreadable files are skipped each time instead.
    val = _val_loader(config, data, spec, options, val_cache, reporter)
    return Loaders(sampler, DataLoader(train_set, batch_sampler=sampler, **options), val,
                   _LoadFailures(reporter, None if distributed.enabled else sampler),
                   _LoadFailures(reporter, None),
                   _gallery_loader(config, data, spec, options) if val is not None else None,
                   _LoadFailures(reporter, None))


def _stream_loaders(config: TrainConfig, data: TrainData, spec: ModelSpec, machine,
                    reporter: Reporter) -> Loaders:
    """Training streamed from shards (see ``data/stream.py``); validation as for folders."""
    distributed, world = machine.distributed, machine.distributed.world_size
    streams = stream_count(data.shards, world, machine.workers)
    if machine.workers > streams:
        reporter.message(f"{len(data.shards.urls)} shards feed {streams} loader process(es) "
                         f"per training process, not {machine.workers}")
    sampler = ShardTrainStream(
        data.shards, train_transform(config.augment, spec.image_size, spec.mean, spec.std),
        config.views, config.batch_size, config.target_batch // (config.batch_size * world),
        config.samples_per_class, steps_per_epoch(data.shards.count, config.target_batch),
        config.shuffle_buffer, config.seed, distributed.rank, world, config.max_image_pixels,
        min_side=min_decode_side(spec.image_size), mix=config.accumulation == "cache",
    )
    workers = streams if machine.workers > 0 else 0
    # Not persistent: each epoch's iterator carries the epoch (and skip) to the workers.
    options: dict[str, Any] = {"num_workers": workers,
                               "pin_memory": machine.device.type == "cuda"}
    if workers > 0:
        options.update(prefetch_factor=4, worker_init_fn=ignore_sigint)
    return Loaders(sampler, DataLoader(sampler, batch_size=None, **options),
                   _val_loader(config, data, spec, {**options, "collate_fn": collate}, None,
                               reporter),
                   _LoadFailures(reporter, None), _LoadFailures(reporter, None))


def _val_loader(config: TrainConfig, data: TrainData, spec: ModelSpec, options: dict[str, Any],
                val_cache, reporter: Reporter) -> DataLoader | None:
    if data.val_paths:
        val_set = eval_photos(spec, data.val_paths, data.val_labels,
                              max_pixels=config.max_image_pixels, cache=val_cache)
        return DataLoader(val_set, batch_size=config.batch_size * config.views, shuffle=False,
                          **options)
    if data.shards is not None:
        reporter.message(Wording("no validation images (shards hold none out; give "
                                 "{val_root}): best.pt will not be written", ("val_root",)))
    else:
        reporter.message(Wording("no validation split ({val_fraction} 0): best.pt will not be "
                                 "written", ("val_fraction",)))
    return None


def _gallery_loader(config: TrainConfig, data: TrainData, spec: ModelSpec,
                    options: dict[str, Any]) -> DataLoader | None:
    """Up to ``--gallery-check`` training photos, spread over the classes, as eval sees them."""
    if config.gallery_check == 0:
        return None
    chosen = gallery_sample(data.train_labels, config.gallery_check, config.seed)
    gallery = eval_photos(spec, [data.scan.paths[data.train_index[i]] for i in chosen],
                          data.train_labels[chosen], max_pixels=config.max_image_pixels)
    # Used twice a run: its loader processes end after each use.
    return DataLoader(gallery, batch_size=config.batch_size * config.views, shuffle=False,
                      **{**options, "persistent_workers": False})


def _cache_images(groups: list[list[Path]], keep_side: int, max_pixels: int,
                  reporter: Reporter, stop: StopRequest) -> list[DecodedImages]:
    """Decode every image of each group once (``cache_images``), within the memory share."""
    limit = memory_share(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    started = time.perf_counter()
    caches: list[DecodedImages] = []
    reporter.work_start("decoding images into memory", sum(len(paths) for paths in groups))
    stop.before = Wording("while decoding images for {cache_images}, before any training",
                          ("cache_images",))
    try:
        for paths in groups:
            left = None if limit is None else limit - sum(cache.nbytes for cache in caches)
            # A signal here stops at once (see StopRequest): nothing is trained yet.
            caches.append(DecodedImages.build(paths, keep_side, max_pixels, memory_limit=left,
                                              on_progress=reporter.work_advance))
    finally:
        reporter.work_end()
        stop.before = "before training started"
    nbytes = sum(cache.nbytes for cache in caches)
    reporter.message(Wording(
        f"{{cache_images}}: {sum(len(cache) for cache in caches)} images decoded once in "
        f"{time.perf_counter() - started:.1f} s, {nbytes / 2**20:.0f} MiB in memory",
        ("cache_images",)))
    return caches
