"""Run a model over a loader of images and collect their features: the one forward pass that
training's validation, ``embed``, ``index`` and ``search`` share."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from ascension_cli.data.dataset import Batch, Failed
from ascension_cli.model.backbone import EmbeddingModel
from ascension_cli.runtime import to_input

FEATURE_KINDS = ("backbone", "head")


@torch.inference_mode()
def extract_features(
    model: EmbeddingModel,
    loader: DataLoader,
    device: torch.device,
    feature_kind: str = "backbone",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    on_failed: Callable[[Failed], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    channels_last: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and dataset indices of every readable image, in loader order.

    ``feature_kind`` is ``backbone`` (pooled trunk features, the usual choice for retrieval) or
    ``head`` (the projection SupCon trained). Unreadable images are passed to ``on_failed`` and
    left out. ``channels_last`` hands the model NHWC batches (see ``runtime.to_input``).
    """
    if feature_kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {feature_kind!r}")
    was_training = model.training
    model.eval()
    # Filled in place as batches stream by: memory is the vectors, allocated once.
    total = len(loader.dataset)
    features: np.ndarray | None = None
    labels = np.empty(total, np.int64)
    indices = np.empty(total, np.int64)
    filled = 0
    try:
        batch: Batch
        for batch in loader:
            for failure in batch.failed:
                if on_failed is not None:
                    on_failed(failure)
            if len(batch):
                images = to_input(batch.images, device, channels_last)
                with autocast():
                    output = model.features(images) if feature_kind == "backbone" else model(images)
                if features is None:
                    features = np.empty((total, output.shape[1]), np.float32)
                stop = filled + len(batch)
                features[filled:stop] = output.float().cpu().numpy()
                labels[filled:stop] = batch.labels.numpy()
                indices[filled:stop] = batch.indices.numpy()
                filled = stop
            if on_batch is not None:
                on_batch(len(batch) + len(batch.failed))
    finally:
        model.train(was_training)
    if features is None:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return features[:filled], labels[:filled], indices[:filled]
