"""Which images train and which validate: the split policy of a training run.

A manifest's split column decides where it has one (its test rows are never read); else a
separate validation source (``val_root``: a folder, or a manifest's validation rows), else a
seeded per-class share (``val_fraction``). Shards are streamed, so nothing can be held out of
them: their validation comes from ``val_root`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascension_cli.data.folder import FolderScan, stratified_split
from ascension_cli.data.manifest import scan_source
from ascension_cli.data.shards import ShardSet, is_shards, open_shards
from ascension_cli.errors import ConfigError, DataError


@dataclass
class TrainData:
    """The images of a run: ``scan`` (classes, labels, paths), the training rows of it, and the
    validation images. With shards, training streams from ``shards`` and ``scan`` holds only
    their classes and per-class labels (no paths)."""

    scan: FolderScan
    train_index: np.ndarray
    val_paths: list[Path]
    val_labels: np.ndarray
    val_skipped: int
    shards: ShardSet | None = None

    @property
    def train_labels(self) -> np.ndarray:
        return self.scan.labels[self.train_index]


def validation_scan(source, classes: list[str]) -> FolderScan:
    """``val_root``: a folder, or a manifest (its validation rows when it has a split column)."""
    scan = scan_source(source, classes=classes)
    if scan.splits is None:
        return scan
    chosen = scan.subset(scan.splits == "validation")
    if not len(chosen):
        raise DataError(f"{{val_root}} {source} has a split column but no validation rows",
                        options=("val_root",))
    return chosen


def _shard_data(data_root, val_root, fraction_given: bool, cache_images: bool) -> TrainData:
    if cache_images:
        raise ConfigError("{cache_images} applies to folders and manifests, not shards (they "
                          "are streamed)", options=("cache_images",))
    if fraction_given:
        raise ConfigError("shards are streamed, so no images can be held out of them: give "
                          "{val_root} (a folder or manifest) instead of {val_fraction}",
                          options=("val_fraction", "val_root"))
    shards = open_shards(data_root)
    labels = np.repeat(np.arange(len(shards.classes)), shards.class_counts)
    scan = FolderScan(Path(str(data_root)), shards.classes, [], labels)
    data = TrainData(scan, np.arange(len(labels)), [], np.zeros(0, np.int64), 0, shards)
    if val_root is not None:
        val_scan = validation_scan(val_root, shards.classes)
        data.val_paths, data.val_labels = val_scan.paths, val_scan.labels
        data.val_skipped = sum(val_scan.skipped.values())
    return data


def training_data(
    data_root, val_root=None, val_fraction: float = 0.1, seed: int = 0,
    fraction_given: bool = False, cache_images: bool = False,
) -> TrainData:
    """The training and validation images of ``data_root`` (a folder, manifest or shards), as
    the module notes say. ``fraction_given``: whether the caller chose ``val_fraction`` (it is
    refused where the data names its validation rows)."""
    if is_shards(data_root):
        return _shard_data(data_root, val_root, fraction_given, cache_images)
    scan = scan_source(data_root)
    train = np.ones(len(scan), dtype=bool) if scan.splits is None else scan.splits == "train"
    if not train.any():
        raise DataError(f"{data_root} has no rows of split 'train' to train on")
    if val_root is not None:
        val_scan = validation_scan(val_root, scan.classes)
        return TrainData(scan, np.flatnonzero(train), val_scan.paths, val_scan.labels,
                         sum(val_scan.skipped.values()))
    named = np.zeros(len(scan), bool) if scan.splits is None else scan.splits == "validation"
    if named.any():
        if fraction_given:
            raise ConfigError(f"{data_root} names its validation rows (split column): drop "
                              "{val_fraction}", options=("val_fraction",))
        val_index = np.flatnonzero(named)
        return TrainData(scan, np.flatnonzero(train), [scan.paths[i] for i in val_index],
                         scan.labels[val_index], 0)
    rows = np.flatnonzero(train)
    train_index, val_index = stratified_split(scan.labels[rows], val_fraction, seed)
    return TrainData(scan, rows[train_index], [scan.paths[i] for i in rows[val_index]],
                     scan.labels[rows[val_index]], 0)
