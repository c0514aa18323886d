"""Run a model over images, collect L2-normalised vectors, and read/write vectors files."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ascension_cli.atomic import atomic_write
from ascension_cli.checkpoint import load_model
from ascension_cli.data.augment import eval_transform
from ascension_cli.data.dataset import EvalDataset, Failed, collate
from ascension_cli.data.folder import scan_images
from ascension_cli.errors import DataError, VectorsError
from ascension_cli.inference import extract_features
from ascension_cli.model import EmbeddingModel, ModelSpec
from ascension_cli.paths import VECTORS_FORMAT, VECTORS_VERSION, not_ours, vectors_file
from ascension_cli.runtime import (
    autocast_factory,
    resolve_device,
    resolve_precision,
    resolve_workers,
    use_channels_last,
)

# Arrays every vectors file holds (save_vectors writes them all).
_VECTORS_KEYS = ("vectors", "labels", "paths", "class_names", "model_name", "checkpoint_sha256",
                 "feature_kind", "image_root", "failed")


@dataclass
class Vectors:
    """An embedding export: one L2-normalised float32 row per image, with its provenance."""

    vectors: np.ndarray
    labels: np.ndarray
    paths: list[str]
    class_names: list[str] = field(default_factory=list)
    model_name: str = ""
    checkpoint_sha256: str = ""
    feature_kind: str = "backbone"
    image_root: str = ""
    failed: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_vectors(path: str | Path, data: Vectors) -> None:
    """Write an ``.npz`` atomically (temp file, fsync, rename): the old file or all the new."""
    atomic_write(
        path,
        lambda handle: np.savez(
            handle,
            format=np.array(VECTORS_FORMAT),
            version=np.array(VECTORS_VERSION),
            vectors=np.ascontiguousarray(data.vectors, dtype=np.float32),
            labels=np.asarray(data.labels, dtype=np.int64),
            paths=np.array(data.paths, dtype=str),
            class_names=np.array(data.class_names, dtype=str),
            model_name=np.array(data.model_name),
            checkpoint_sha256=np.array(data.checkpoint_sha256),
            feature_kind=np.array(data.feature_kind),
            image_root=np.array(data.image_root),
            failed=np.array(data.failed, dtype=str),
        ),
    )


def load_vectors(path: str | Path) -> Vectors:
    """Read and check a vectors file; every problem is a one-line VectorsError."""
    path = Path(path)
    try:
        vectors_file(path)
    except ValueError as exc:
        raise VectorsError(str(exc)) from None
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {key: archive[key] for key in archive.files}
        missing = [key for key in _VECTORS_KEYS if key not in contents]
    except Exception:  # numpy and zipfile raise many kinds for a damaged archive
        missing = ["readable arrays"]
    if missing:
        raise VectorsError(str(not_ours(path, "an Ascension vectors file",
                                        f"it lacks {', '.join(missing)}")))
    vectors = contents["vectors"]

    if vectors.ndim != 2 or len(vectors) == 0:
        raise VectorsError(f"{path} holds no vectors")
    if not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors).all(axis=1)).sum())
        raise VectorsError(f"{path}: {bad} vector(s) contain NaN or infinity")
    labels = contents["labels"]
    if len(labels) != len(vectors) or len(contents["paths"]) != len(vectors):
        raise VectorsError(f"{path}: vectors, labels and paths differ in length")
    return Vectors(
        vectors=vectors.astype(np.float32, copy=False),
        labels=labels.astype(np.int64, copy=False),
        paths=contents["paths"].tolist(),
        class_names=contents["class_names"].tolist(),
        model_name=str(contents["model_name"]),
        checkpoint_sha256=str(contents["checkpoint_sha256"]),
        feature_kind=str(contents["feature_kind"]),
        image_root=str(contents["image_root"]),
        failed=contents["failed"].tolist(),
    )


def write_index(path: str | Path, vectors: np.ndarray, kind: str = "flat") -> None:
    """A FAISS index of the vectors, written atomically."""
    import faiss

    from ascension_cli.retrieval.index import build_index

    index = build_index(vectors, kind, use_gpu=False)
    atomic_write(path, lambda handle: handle.write(faiss.serialize_index(index).tobytes()))


def embed_images(
    model: EmbeddingModel,
    spec: ModelSpec,
    paths: list[Path],
    labels: np.ndarray | None = None,
    kind: str = "backbone",
    batch_size: int = 64,
    precision: str = "auto",
    workers: int | None = 0,
    device: str = "auto",
    image_size: int | None = None,
    recolor: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_failed: Callable[[Failed], None] | None = None,
    channels_last: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, labels, indices into ``paths``) of the readable images, with the spec's eval
    transform; ``recolor`` (hue90, hue180, grayscale) recolours each image first.
    ``channels_last`` runs the model on NHWC weights and batches (faster convolutions);
    ``workers=None`` picks the loader processes by device (``runtime.resolve_workers``)."""
    run_device = resolve_device(device)
    run_precision = resolve_precision(precision, run_device)
    size = image_size or spec.image_size
    dataset = EvalDataset(
        paths, labels, eval_transform(size, spec.mean, spec.std, spec.crop_pct), recolor,
        min_side=2 * size,
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
        num_workers=resolve_workers(workers, run_device),
        pin_memory=run_device.type == "cuda",
    )
    if on_start is not None:
        on_start(len(dataset))
    return extract_features(
        use_channels_last(model.to(run_device), channels_last), loader, run_device, kind,
        autocast_factory(run_precision, run_device), on_failed, on_batch, channels_last,
    )


def embed_folder(
    checkpoint_path: str | Path,
    image_root: str | Path,
    on_failed: Callable[[Failed], None] | None = None,
    **options,
) -> Vectors:
    """Embed every image under ``image_root`` with a checkpoint's eval transform.

    ``options`` are those of ``embed_images`` (kind, batch_size, precision, workers, device,
    image_size, recolor, on_start, on_batch, channels_last).
    """
    model, spec, _ = load_model(checkpoint_path)
    scan = scan_images(image_root)
    failed: list[str] = []

    def record_failure(failure: Failed) -> None:
        failed.append(scan.paths[failure.index].relative_to(scan.root).as_posix())
        if on_failed is not None:
            on_failed(failure)

    features, labels, indices = embed_images(
        model, spec, scan.paths, scan.labels, on_failed=record_failure, **options
    )
    if len(indices) == 0:
        raise DataError(f"no readable images under {image_root}")
    return Vectors(
        vectors=features,
        labels=labels,
        paths=[scan.paths[i].relative_to(scan.root).as_posix() for i in indices],
        class_names=scan.classes,
        model_name=spec.name,
        checkpoint_sha256=sha256_of(checkpoint_path),
        feature_kind=options.get("kind", "backbone"),
        image_root=str(Path(image_root).resolve()),
        failed=failed,
    )
