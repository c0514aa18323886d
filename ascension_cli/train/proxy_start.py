"""``--proxy-init means``: each class's proxy started where the starting model puts its
training photos (their mean direction), instead of at random, so that from the first step the
proxies of the classes a batch leaves out stand where those classes are."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ascension_cli.data.augment import eval_transform
from ascension_cli.data.dataset import EvalDataset, collate
from ascension_cli.embedding.inference import extract_features

PER_CLASS = 10  # training photos a class's mean is taken over, at most (seeded)


def photos_per_class(labels: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
    """Up to ``PER_CLASS`` of ``rows`` for each class in ``labels`` (aligned), sorted."""
    rng = np.random.default_rng(seed)
    keep = [rng.choice(rows[labels == label], min(PER_CLASS, int((labels == label).sum())),
                       replace=False) for label in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else rows[:0]


def unit_class_means(features: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """(classes, D) mean of each class's unit-length features, made unit length; a class with
    no feature gets a zero row."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    sums = np.zeros((classes, features.shape[1]), np.float64)
    np.add.at(sums, labels, unit)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(
        np.float32)


def start_at_class_means(proxies: torch.Tensor, means: np.ndarray) -> None:
    """Turn each proxy (row) to its class mean's direction, keeping its length (so the proxy
    LR moves it by the same angle as a random start); zero rows leave their proxy as it was."""
    target = torch.as_tensor(means, dtype=proxies.dtype, device=proxies.device)
    present = target.norm(dim=1) > 0
    with torch.no_grad():
        lengths = proxies.norm(dim=1, keepdim=True)
        proxies[present] = (target * lengths)[present]


def class_means(model, spec, data, machine, batch_size: int, channels_last: bool,
                max_pixels: int, seed: int) -> np.ndarray:
    """The starting model's unit class means over up to ``PER_CLASS`` training photos a class
    (what the loss trains: pooled features, or the head's output)."""
    rows = np.asarray(data.train_index)
    keep = photos_per_class(data.scan.labels[rows], rows, seed)
    dataset = EvalDataset([data.scan.paths[i] for i in keep], data.scan.labels[keep],
                          eval_transform(spec.image_size, spec.mean, spec.std, spec.crop_pct),
                          max_pixels=max_pixels, min_side=2 * spec.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    kind = "backbone" if spec.head == "none" else "head"
    features, labels, _ = extract_features(model, loader, machine.device, kind,
                                           machine.autocast, channels_last=channels_last)
    return unit_class_means(features, labels, len(data.scan.classes))
