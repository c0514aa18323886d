"""Albumentations pipelines for training views and evaluation, normalised like the backbone."""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np

AUGMENTATIONS = ("color-agnostic", "color-preserving", "standard", "none")


def _normalise(mean: Sequence[float], std: Sequence[float]) -> list:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)]


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0
) -> A.Compose:
    """Resize the short side to ``image_size / crop_pct``, centre-crop, normalise."""
    resize_to = max(image_size, int(round(image_size / max(crop_pct, 1e-3))))
    return A.Compose(
        [
            A.SmallestMaxSize(
                max_size=resize_to, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"
            ),
            A.CenterCrop(height=image_size, width=image_size),
            *_normalise(mean, std),
        ]
    )


def train_transform(
    augmentation: str, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> A.Compose:
    """The per-view training pipeline.

    ``color-agnostic``: crop/flip/mild geometry, then colour destroyed or randomised, so the same
    item in another colour lands close. ``color-preserving``: the same geometry with lighting
    changes only, for catalogues where colour tells items apart. ``standard``: SimCLR-style.
    ``none``: the eval transform.
    """
    size = (image_size, image_size)
    if augmentation == "none":
        return eval_transform(image_size, mean, std)
    geometry = [
        A.RandomResizedCrop(size=size, scale=(0.35, 1.0), area_for_downscale="image"),
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-12, 12), shear=(-6, 6), scale=(0.9, 1.1), p=0.3),
    ]
    degrade = A.OneOf([A.GaussianBlur(blur_limit=(3, 7), p=1.0),
                       A.GaussNoise(std_range=(0.02, 0.08), p=1.0)], p=0.3)
    if augmentation == "color-preserving":
        # Lighting changes only: the hue and most of the saturation are kept, so a red and a
        # green apple stay apart.
        steps = [*geometry,
                 A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.1, hue=0.0, p=0.8),
                 degrade]
    elif augmentation == "color-agnostic":
        steps = [
            *geometry,
            A.OneOf(
                [
                    A.ToGray(num_output_channels=3, p=1.0),
                    A.ChannelShuffle(p=1.0),
                    A.HueSaturationValue(
                        hue_shift_limit=180, sat_shift_limit=60, val_shift_limit=30, p=1.0
                    ),
                    A.ColorJitter(
                        brightness=0.4, contrast=0.4, saturation=0.8, hue=0.5, p=1.0
                    ),
                ],
                p=0.9,
            ),
            degrade,
        ]
    elif augmentation == "standard":
        steps = [
            A.RandomResizedCrop(size=size, scale=(0.2, 1.0), area_for_downscale="image"),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
            A.ToGray(num_output_channels=3, p=0.2),
            A.GaussianBlur(blur_limit=(3, 7), p=0.5),
        ]
    else:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}")
    return A.Compose([*steps, *_normalise(mean, std)])


def reseed(transform: A.Compose, seed: int) -> None:
    """Give every transform in the tree its own generator derived from ``seed``.

    Albumentations' ``set_random_seed`` hands the same seed to every child, which makes their
    random draws identical (every ``p`` check would agree); we derive one seed per node instead,
    so a sample's augmentation depends only on its seed, not on the worker that made it.
    """
    counter = 0

    def visit(node) -> None:
        nonlocal counter
        counter += 1
        node.random_generator = np.random.default_rng([seed, counter])
        node.py_random = random.Random(seed * 4099 + counter)
        for child in getattr(node, "transforms", ()):
            visit(child)

    visit(transform)


RECOLORINGS = ("hue90", "hue180", "grayscale")


def recolor(image: np.ndarray, recolouring: str) -> np.ndarray:
    """The same RGB image in other colours: hue rotated by 90 or 180 degrees, or grayscale."""
    if recolouring == "grayscale":
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if recolouring in ("hue90", "hue180"):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = 45 if recolouring == "hue90" else 90  # OpenCV hue runs 0-179
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    raise ValueError(f"unknown recolouring {recolouring!r}; choose one of {RECOLORINGS}")
