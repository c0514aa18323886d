"""Run a model over images and collect L2-normalised feature vectors."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from ascension_cli.data.dataset import Batch, Failed
from ascension_cli.model import EmbeddingModel

FEATURE_KINDS = ("backbone", "head")


@torch.inference_mode()
def extract_features(
    model: EmbeddingModel,
    loader: DataLoader,
    device: torch.device,
    kind: str = "backbone",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    on_failed: Callable[[Failed], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and dataset indices of every readable image, in loader order.

    ``kind`` is ``backbone`` (pooled trunk features, the usual choice for retrieval) or ``head``
    (the projection SupCon trained). Unreadable images are passed to ``on_failed`` and left out.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}")
    was_training = model.training
    model.eval()
    features, labels, indices = [], [], []
    try:
        batch: Batch
        for batch in loader:
            for failure in batch.failed:
                if on_failed is not None:
                    on_failed(failure)
            if len(batch):
                images = batch.images.to(device, non_blocking=True)
                with autocast():
                    output = model.features(images) if kind == "backbone" else model(images)
                features.append(output.float().cpu())
                labels.append(batch.labels)
                indices.append(batch.indices)
            if on_batch is not None:
                on_batch(len(batch) + len(batch.failed))
    finally:
        model.train(was_training)
    if not features:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (
        torch.cat(features).numpy(),
        torch.cat(labels).numpy(),
        torch.cat(indices).numpy(),
    )
