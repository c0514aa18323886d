"""Run a checkpoint's model over image files and folders: L2-normalised vectors with labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ascension_cli.atomic import atomic_write
from ascension_cli.data.augment import eval_transform
from ascension_cli.data.dataset import EvalDataset, Failed, collate
from ascension_cli.data.folder import FolderScan
from ascension_cli.data.manifest import for_evaluation, scan_any
from ascension_cli.embed.inference import extract_features
from ascension_cli.embed.vectors import Vectors, sha256_of
from ascension_cli.errors import DataError
from ascension_cli.model.backbone import EmbeddingModel, ModelSpec
from ascension_cli.model.checkpoint import load_model
from ascension_cli.runtime import (
    autocast_factory,
    resolve_device,
    resolve_precision,
    resolve_workers,
    use_channels_last,
)


def write_index(path: str | Path, vectors: np.ndarray, index_kind: str = "flat") -> dict:
    """A FAISS index of the vectors, written atomically; returns its shape (``IndexPlan``) and,
    for an approximate kind, its recall@10 against exact search on held-out vectors."""
    import faiss

    from ascension_cli.retrieval.index import build_index, plan_index, recall_against_exact

    plan = plan_index(len(vectors), vectors.shape[1], index_kind)
    index = build_index(vectors, index_kind, use_gpu=False, plan=plan)
    info = {**asdict(plan), "memory_bytes": plan.memory_bytes}
    if index_kind != "flat" and len(vectors) > 1:
        recall, sample, held_out = recall_against_exact(index, vectors, plan)
        info.update(recall_at_10_vs_exact=recall, recall_sample=sample,
                    recall_sample_held_out=held_out)
    atomic_write(path, lambda handle: handle.write(faiss.serialize_index(index).tobytes()))
    return info


def embed_images(
    model: EmbeddingModel,
    spec: ModelSpec,
    paths: list[Path],
    labels: np.ndarray | None = None,
    image_size: int | None = None,
    recolouring: str | None = None,
    **options,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, labels, indices into ``paths``) of the readable images, with the spec's eval
    transform; ``recolouring`` (hue90, hue180, grayscale) recolours each image first.
    ``options`` are ``embed_dataset``'s."""
    size = image_size or spec.image_size
    dataset = EvalDataset(
        paths, labels, eval_transform(size, spec.mean, spec.std, spec.crop_pct), recolouring,
        min_side=2 * size,
    )
    return embed_dataset(model, dataset, **options)


def embed_dataset(
    model: EmbeddingModel,
    dataset,
    feature_kind: str = "backbone",
    batch_size: int = 64,
    precision: str = "auto",
    workers: int | None = 0,
    device: str = "auto",
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_failed: Callable[[Failed], None] | None = None,
    channels_last: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, labels, dataset indices) of the readable items of an eval dataset (items
    ``(image, label, index)``, or ``Failed``). ``channels_last`` runs the model on NHWC weights
    and batches (faster convolutions); ``workers=None`` picks the loader processes by device
    (``runtime.resolve_workers``)."""
    run_device = resolve_device(device)
    run_precision = resolve_precision(precision, run_device)
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate,
        num_workers=resolve_workers(workers, run_device),
        pin_memory=run_device.type == "cuda",
    )
    if on_start is not None:
        on_start(len(dataset))
    return extract_features(
        use_channels_last(model.to(run_device), channels_last), loader, run_device, feature_kind,
        autocast_factory(run_precision, run_device), on_failed, on_batch, channels_last,
    )


def embed_folder(
    checkpoint_path: str | Path,
    image_root: str | Path,
    on_failed: Callable[[Failed], None] | None = None,
    split: str | None = None,
    evaluation: bool = False,
    **options,
) -> Vectors:
    """Embed every image under ``image_root`` (a folder, or a manifest's rows: only ``split``'s
    when given, only those flagged query or gallery when ``evaluation``) with a checkpoint's eval
    transform.

    ``options`` are those of ``embed_images`` (feature_kind, batch_size, precision, workers, device,
    image_size, recolouring, on_start, on_batch, channels_last).
    """
    model, spec, _ = load_model(checkpoint_path)
    scan = scan_any(image_root, split)
    if evaluation:
        scan = for_evaluation(scan)
    failed: list[str] = []

    def record_failure(failure: Failed) -> None:
        failed.append(scan.name(failure.index))
        if on_failed is not None:
            on_failed(failure)

    features, labels, indices = embed_images(
        model, spec, scan.paths, scan.labels, on_failed=record_failure, **options
    )
    if len(indices) == 0:
        raise DataError(f"no readable images in {image_root}")
    return vectors_of(scan, indices, features, labels, spec.name, sha256_of(checkpoint_path),
                      options.get("feature_kind", "backbone"), failed)


def vectors_of(
    scan: FolderScan, indices: np.ndarray, features: np.ndarray, labels: np.ndarray,
    model_name: str, checkpoint_sha256: str, feature_kind: str, failed: list[str],
) -> Vectors:
    """The vectors file's contents for the embedded images ``indices`` of ``scan``, with a
    manifest's query/gallery roles and item ids carried along."""

    def pick(values):
        return None if values is None else np.asarray(values)[indices]

    return Vectors(
        vectors=features,
        labels=labels,
        paths=[scan.name(i) for i in indices],
        class_names=scan.classes,
        model_name=model_name,
        checkpoint_sha256=checkpoint_sha256,
        feature_kind=feature_kind,
        image_root=str(scan.root.resolve()),
        failed=failed,
        is_query=pick(scan.is_query),
        is_gallery=pick(scan.is_gallery),
        item_ids=None if scan.item_ids is None else [scan.item_ids[i] for i in indices],
    )
