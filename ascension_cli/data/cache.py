"""Decoded, resized images kept in memory: each file is decoded once per run, not once per epoch.

For datasets that fit in RAM. Images are stored as 8-bit RGB whose short side is at most
``keep_side`` (the trainer uses twice the input size, as reduced JPEG decoding already does), in
a few large buffers: forked loader processes share the pages instead of copying them, since no
per-image Python object is touched when reading.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from ascension_cli.data.folder import ImageDecodeError, load_image
from ascension_cli.errors import ConfigError
from ascension_cli.formats import DEFAULT_MAX_PIXELS

CHUNK_BYTES = 64 << 20  # images are packed into buffers of about this size


def shrink(image: np.ndarray, keep_side: int) -> np.ndarray:
    """The image with its short side reduced to ``keep_side`` (area interpolation); never
    enlarged."""
    height, width = image.shape[:2]
    short = min(height, width)
    if short <= keep_side:
        return image
    scale = keep_side / short
    size = (max(keep_side, round(width * scale)), max(keep_side, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


# Share of the free memory the image cache may fill (the rest: model, loader processes, system),
# split between the training processes of one machine.
CACHE_MEMORY_SHARE = 0.6


def memory_share(processes_here: int = 1) -> int | None:
    """Bytes one of ``processes_here`` training processes may cache; None if unknown."""
    available = available_memory()
    return None if available is None else int(available * CACHE_MEMORY_SHARE / processes_here)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class DecodedImages:
    """Images by dataset index; a file that failed to decode raises its ImageDecodeError again."""

    def __init__(self, chunks: list[np.ndarray], where: list[tuple[int, int, tuple[int, ...]]],
                 errors: dict[int, str]):
        self._chunks = chunks
        self._where = where  # per image: (chunk, offset, shape); shape () when it failed
        self._errors = errors

    def __len__(self) -> int:
        return len(self._where)

    @property
    def nbytes(self) -> int:
        return sum(chunk.nbytes for chunk in self._chunks)

    @property
    def failed(self) -> int:
        return len(self._errors)

    def __getitem__(self, index: int) -> np.ndarray:
        if index in self._errors:
            raise ImageDecodeError(self._errors[index])
        chunk, offset, shape = self._where[index]
        size = int(np.prod(shape))
        # A read-only view: augmentations must not write into the cache.
        view = self._chunks[chunk][offset : offset + size].reshape(shape)
        view.flags.writeable = False
        return view

    @classmethod
    def build(
        cls,
        paths: Sequence[Path],
        keep_side: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
        memory_limit: int | None = None,
        on_progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> DecodedImages | None:
        """Decode every path (OpenCV releases the GIL, so threads decode in parallel).

        ``memory_limit``: stop with a ConfigError as soon as the cache would exceed it.
        ``should_stop`` is asked between windows of files; when it says so, None is returned.
        """
        threads = threads or min(8, os.cpu_count() or 1)
        min_side = keep_side  # libjpeg may decode at reduced scale down to this short side

        def decode(path: Path) -> np.ndarray | str:
            try:
                return np.ascontiguousarray(shrink(load_image(path, max_pixels, min_side),
                                                   keep_side))
            except ImageDecodeError as exc:
                return str(exc)

        packer = _Packer(memory_limit, len(paths))
        # Files go to the threads a window at a time, so a stop or an error waits for one
        # window, and decoded images never run far ahead of the packing.
        window = 4 * threads
        with ThreadPoolExecutor(threads) as pool:
            for start in range(0, len(paths), window):
                if should_stop is not None and should_stop():
                    return None
                results = pool.map(decode, paths[start : start + window])
                for index, result in enumerate(results, start=start):
                    packer.add(index, result)
                if on_progress is not None:
                    on_progress(min(window, len(paths) - start))
        packer.flush()
        return cls(packer.chunks, packer.where, packer.errors)


class _Packer:
    """Packs decoded images into large chunks (few allocations), noting where each one is, or
    why it failed; refuses to grow past ``memory_limit`` bytes."""

    def __init__(self, memory_limit: int | None, count: int):
        self.memory_limit, self.count = memory_limit, count
        self.chunks: list[np.ndarray] = []
        self.where: list[tuple[int, int, tuple[int, ...]]] = []
        self.errors: dict[int, str] = {}
        self.pending: list[np.ndarray] = []
        self.pending_bytes = self.total = 0

    def add(self, index: int, result: np.ndarray | str) -> None:
        if isinstance(result, str):
            self.errors[index] = result
            self.where.append((0, 0, ()))
            return
        self.where.append((len(self.chunks), self.pending_bytes, result.shape))
        self.pending.append(result)
        self.pending_bytes += result.nbytes
        self.total += result.nbytes
        if self.memory_limit is not None and self.total > self.memory_limit:
            raise ConfigError(
                f"{{cache_images}}: the decoded images pass {self.memory_limit / 2**30:.1f} "
                f"GiB after {index + 1} of {self.count} files, more than this machine has "
                "free; train without it", options=("cache_images",))
        if self.pending_bytes >= CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.chunks.append(np.concatenate([image.reshape(-1) for image in self.pending]))
        self.pending, self.pending_bytes = [], 0
