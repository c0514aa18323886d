"""Datasets over shard samples: class-balanced training micro-batches streamed through a
shuffle buffer, and one shard's samples for embedding.

Training. Every (rank, loader worker) pair reads its own shards, ``shard i`` going to stream
``i % streams``: no image is read twice in a pass, and there must be at least as many shards as
streams. Each stream fills a buffer of encoded images, then emits micro-batches of whole class
groups (``samples_per_class`` images of one class, a class picked at random among those the
buffer holds enough of), so a target batch gathered from several micro-batches is class-balanced
as with a folder. A stream cycles over its shards (re-shuffled each pass) for exactly
``batches_per_epoch`` steps, the same on every rank. Everything is seeded by (seed, epoch, rank,
worker): epoch ``e`` draws the same batches whether or not the run was resumed, and a resume
mid-epoch skips the micro-batches already trained on without decoding them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ascension_cli.data.augment import reseed
from ascension_cli.data.dataset import Failed, _to_tensor, collate, stack_channels_last
from ascension_cli.data.folder import ImageDecodeError, decode_image
from ascension_cli.data.shards import Sample, ShardSet, read_samples
from ascension_cli.errors import ConfigError, DataError
from ascension_cli.formats import DEFAULT_MAX_PIXELS


def _decoded(sample: Sample, index: int, max_pixels: int, min_side: int | None):
    """The sample's image as 8-bit RGB, or the ``Failed`` record of why it cannot be read."""
    try:
        return decode_image(sample.data, sample.name, max_pixels, min_side)
    except ImageDecodeError as exc:
        return Failed(index, str(exc))


def stream_count(shards: ShardSet, world_size: int, workers: int) -> int:
    """Loader workers per rank that the shards allow (at least one shard per stream); raises
    ConfigError when there are fewer shards than ranks."""
    if len(shards.urls) < world_size:
        raise ConfigError(f"{len(shards.urls)} shard(s) cannot be split among {world_size} "
                          "processes without reading some twice: write at least one shard per "
                          "process (a smaller {shard_size})", options=("shard_size",))
    return max(1, min(max(1, workers), len(shards.urls) // world_size))


class ShardTrainStream(IterableDataset):
    """Class-balanced micro-batches of ``views`` augmented views from a shard stream."""

    def __init__(
        self, shards: ShardSet, transform, views: int, micro_batch: int, micro_per_step: int,
        samples_per_class: int, batches_per_epoch: int, buffer: int, seed: int,
        rank: int = 0, world_size: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int | None = None, mix: bool = True,
    ):
        self.shards, self.transform, self.views = shards, transform, views
        self.micro_batch, self.micro_batches_per_step = micro_batch, micro_per_step
        self.samples_per_class = samples_per_class
        self.batches_per_epoch, self.buffer = batches_per_epoch, buffer
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.max_pixels, self.min_side = max_pixels, min_side
        self.epoch, self.skip = 0, 0
        self.mix = mix  # spread each step's images over its micro-batches (gradient caching)

    # A stream cannot leave an unreadable image out of later epochs: it skips it each time.
    excluded: frozenset[int] = frozenset()

    def exclude(self, indices) -> None:
        """Nothing to do: see ``excluded``."""

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The epoch to draw, less its first ``skip`` steps (already trained on)."""
        self.epoch, self.skip = epoch, skip

    def _my_shards(self, worker: int, workers: int) -> list[str]:
        stream, streams = self.rank * workers + worker, self.world_size * workers
        return [url for i, url in enumerate(self.shards.urls) if i % streams == stream]

    def _samples(self, urls: list[str], rng: np.random.Generator) -> Iterator[Sample]:
        counts = dict(zip(self.shards.urls, self.shards.counts, strict=True))
        while True:  # pass after pass, each in a new order
            found = 0
            for position in rng.permutation(len(urls)):
                for sample in read_samples(urls[position], counts[urls[position]],
                                           len(self.shards.classes)):
                    found += 1
                    yield sample
            if not found:
                raise DataError(f"shards {', '.join(urls[:3])} hold no readable samples")

    def _draws(self, samples: Iterator[Sample], rng: np.random.Generator, buffer: int):
        """A generator sent a count (at most half of ``buffer``), answering that many images in
        whole class groups drawn from a shuffle buffer of ``buffer`` encoded images."""
        pool: dict[int, list[Sample]] = {}
        held = 0
        size = yield []
        while True:
            while held < buffer:
                sample = next(samples)
                pool.setdefault(sample.label, []).append(sample)
                held += 1
            drawn: list[Sample] = []
            while len(drawn) < size:
                largest = max(len(members) for members in pool.values())
                need = min(self.samples_per_class, largest, size - len(drawn))
                ready = sorted(label for label, members in pool.items() if len(members) >= need)
                members = pool[ready[rng.integers(len(ready))]]
                for _ in range(need):
                    drawn.append(members.pop(rng.integers(len(members))))
                if not members:
                    pool = {label: kept for label, kept in pool.items() if kept}
                held -= need
            size = yield drawn

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        mine = self._my_shards(worker, workers)
        # No larger than this stream's images: a buffer filled by a second pass would hold
        # the same images twice (and read them twice before the first batch).
        counts = dict(zip(self.shards.urls, self.shards.counts, strict=True))
        held = sum(counts[url] for url in mine)
        per_step = self.micro_batches_per_step
        draws = self._draws(self._samples(mine, rng), rng,
                            max(2 * self.micro_batch * per_step, min(self.buffer, held)))
        next(draws)
        for step in range(self.batches_per_epoch):
            # Micro-batch j of the epoch comes from worker j % workers (the loader's round
            # robin); this worker draws all of its micro-batches of a step at once, so that
            # the step holds whole class groups, then deals them out.
            positions = [p for p in range(step * per_step, (step + 1) * per_step)
                         if p % workers == worker]
            if not positions:
                continue
            images = draws.send(len(positions) * self.micro_batch)
            if self.mix and len(positions) > 1:
                # Gradient caching: classes spread over the micro-batches, so BatchNorm
                # normalises each alike (as the folder sampler does).
                images = [images[i] for i in rng.permutation(len(images))]
            if step < self.skip:
                continue  # trained on before the resume: read, not decoded
            for number, position in enumerate(positions):
                # Augmentation seeds depend on the position alone, so skipping changes none.
                seeds = np.random.default_rng([self.seed, self.epoch, self.rank, position, 1])
                batch = images[number * self.micro_batch:(number + 1) * self.micro_batch]
                yield collate([self._views(sample, int(seeds.integers(2**31)))
                               for sample in batch])

    def _views(self, sample: Sample, seed: int):
        index = int(sample.key) if sample.key.isdigit() else -1
        image = _decoded(sample, index, self.max_pixels, self.min_side)
        if isinstance(image, Failed):
            return image
        reseed(self.transform, seed)
        views = [_to_tensor(self.transform(image=image)["image"]) for _ in range(self.views)]
        return stack_channels_last(views), sample.label, index


class SampleDataset(Dataset):
    """Samples read from a shard, each once with the eval transform: items are (tensor, label,
    index) or ``Failed``. The shard is read once, by the caller; loader workers only decode."""

    def __init__(self, samples: list[Sample], transform, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None):
        self.samples, self.transform = samples, transform
        self.max_pixels, self.min_side = max_pixels, min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = _decoded(sample, index, self.max_pixels, self.min_side)
        if isinstance(image, Failed):
            return image
        return _to_tensor(self.transform(image=image)["image"]), sample.label, index
