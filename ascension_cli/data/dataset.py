"""Torch datasets over scanned image paths: multi-view training samples and eval images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ascension_cli.data.augment import eval_transform, recolor, reseed
from ascension_cli.data.cache import DecodedImages
from ascension_cli.data.folder import ImageDecodeError, load_image
from ascension_cli.formats import DEFAULT_MAX_PIXELS


@dataclass
class Failed:
    """A sample that could not be loaded; the batch goes on without it."""

    index: int
    reason: str


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (C, H, W) tensor over the same memory: channels-last, no copy."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def stack_channels_last(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``(..., C, H, W)`` tensors into one whose channels are innermost in memory.

    ``torch.stack`` would write channels-first (NCHW); convolutions run faster on NHWC, and
    writing it here costs nothing extra, where converting later costs a copy of the batch.
    """
    return torch.stack([tensor.movedim(-3, -1) for tensor in tensors]).movedim(-1, -3)


class _ImageSource:
    paths: list[Path]
    cache: DecodedImages | None
    max_pixels: int
    min_side: int | None

    def _load(self, index: int) -> np.ndarray:
        if self.cache is not None:
            return self.cache[index]
        return load_image(self.paths[index], self.max_pixels, self.min_side)


class MultiViewDataset(_ImageSource, Dataset):
    """``views`` independently augmented copies of each image.

    ``min_side`` lets large JPEGs decode at a reduced scale that still has this short side;
    ``cache`` holds the decoded images already (``--cache-images``), in ``paths`` order.

    Keys are ``(index, seed)`` pairs from the sampler: the seed fixes the augmentation, so a run
    is reproducible whatever the number of workers.
    """

    def __init__(
        self, paths: Sequence[Path], labels: np.ndarray, transform, views: int,
        max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None,
        cache: DecodedImages | None = None,
    ):
        self.cache = cache
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.views = views

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        try:
            image = self._load(index)
        except ImageDecodeError as exc:
            return Failed(index, str(exc))
        reseed(self.transform, seed)
        views = [_to_tensor(self.transform(image=image)["image"]) for _ in range(self.views)]
        return stack_channels_last(views), int(self.labels[index]), index


class EvalDataset(_ImageSource, Dataset):
    """One deterministic view per image (resize + centre crop), optionally recoloured first."""

    def __init__(
        self, paths: Sequence[Path], labels: np.ndarray | None, transform,
        recolouring: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int | None = None, cache: DecodedImages | None = None,
    ):
        self.cache = cache
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.paths = list(paths)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.recolouring = recolouring

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = self._load(index)
        except ImageDecodeError as exc:
            return Failed(index, str(exc))
        if self.recolouring is not None:
            image = recolor(image, self.recolouring)
        label = -1 if self.labels is None else int(self.labels[index])
        return _to_tensor(self.transform(image=image)["image"]), label, index


class InputSpec(Protocol):
    """What a model says about its input (``model.backbone.ModelSpec`` has it)."""

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    crop_pct: float


def min_decode_side(image_size: int) -> int:
    """The short side a JPEG may be decoded down to for an input of ``image_size``: twice it,
    so whoever decodes a photo (training, validation, embed, a lookup) hands the transform the
    same image."""
    return 2 * image_size


def eval_input(spec: InputSpec, image_size: int | None = None):
    """(the eval transform, the short side a photo may be decoded down to) at ``spec``'s input
    size or ``image_size``: how every search sees a photo, from a folder or from a shard."""
    size = image_size or spec.image_size
    return eval_transform(size, spec.mean, spec.std, spec.crop_pct), min_decode_side(size)


def eval_photos(spec: InputSpec, paths: Sequence[Path], labels: np.ndarray | None, *,
                image_size: int | None = None, recolouring: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, cache: DecodedImages | None = None
                ) -> EvalDataset:
    """The photos as every search sees them: the eval transform at ``spec``'s input size (or
    ``image_size``), decoded down to ``min_decode_side``, recoloured first or not."""
    transform, min_side = eval_input(spec, image_size)
    return EvalDataset(paths, labels, transform, recolouring, max_pixels=max_pixels,
                       min_side=min_side, cache=cache)


@dataclass
class Batch:
    images: torch.Tensor  # (B, V, C, H, W) for training, (B, C, H, W) for eval
    labels: torch.Tensor  # (B,)
    indices: torch.Tensor  # (B,) dataset indices
    failed: list[Failed]

    def __len__(self) -> int:
        return int(self.labels.numel())


def collate(items: list) -> Batch:
    """Stack the loaded samples; keep the failures aside so the caller can report them."""
    failed = [item for item in items if isinstance(item, Failed)]
    good = [item for item in items if not isinstance(item, Failed)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long),
                     torch.empty(0, dtype=torch.long), failed)
    images = stack_channels_last([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return Batch(images, labels, indices, failed)
