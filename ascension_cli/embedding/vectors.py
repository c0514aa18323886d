"""The vectors file ``ascension embed`` writes and ``eval`` reads: L2-normalised float32 rows
with their labels, paths and provenance, in one ``.npz``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ascension_cli.atomic import atomic_write
from ascension_cli.errors import VectorsError
from ascension_cli.formats import VECTORS_FORMAT, VECTORS_VERSION
from ascension_cli.paths import checked, not_ours, vectors_file
from ascension_cli.strings import has_strings, packed, unpacked

# Arrays every vectors file holds (save_vectors writes them all).
_VECTORS_KEYS = ("vectors", "labels", "paths", "class_names", "model_name", "checkpoint_sha256",
                 "feature_kind", "image_root", "failed")
# Its lists of strings, stored variable-length (``strings.py``; version 1 files: fixed-width).
_STRINGS = ("paths", "class_names", "failed", "item_ids")


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
    # From a manifest: which rows are queries and gallery items, and each row's item id.
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    item_ids: list[str] | None = None

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
            **packed("paths", data.paths),
            **packed("class_names", data.class_names),
            model_name=np.array(data.model_name),
            checkpoint_sha256=np.array(data.checkpoint_sha256),
            feature_kind=np.array(data.feature_kind),
            image_root=np.array(data.image_root),
            **packed("failed", data.failed),
            **_optional(data),
        ),
    )


def _optional(data: Vectors) -> dict[str, np.ndarray]:
    """The manifest arrays a vectors file holds only when it has them."""
    flags = {key: np.asarray(value, dtype=bool) for key, value in
             (("is_query", data.is_query), ("is_gallery", data.is_gallery)) if value is not None}
    return {**flags, **({} if data.item_ids is None else packed("item_ids", data.item_ids))}


def load_vectors(path: str | Path) -> Vectors:
    """Read and check a vectors file; every problem is a one-line VectorsError."""
    path = checked(vectors_file, Path(path), VectorsError)
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {key: archive[key] for key in archive.files}
        missing = [key for key in _VECTORS_KEYS if not has_strings(contents, key)]
        strings = {} if missing else {key: unpacked(contents, key) for key in _STRINGS
                                      if has_strings(contents, key)}
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
    optional = {key: contents[key] for key in ("is_query", "is_gallery") if key in contents}
    if any(len(array) != len(vectors) for array in
           [labels, strings["paths"], *optional.values(), strings.get("item_ids", labels)]):
        raise VectorsError(f"{path}: vectors, labels and paths differ in length")
    return Vectors(
        vectors=vectors.astype(np.float32, copy=False),
        labels=labels.astype(np.int64, copy=False),
        paths=strings["paths"],
        class_names=strings["class_names"],
        model_name=str(contents["model_name"]),
        checkpoint_sha256=str(contents["checkpoint_sha256"]),
        feature_kind=str(contents["feature_kind"]),
        image_root=str(contents["image_root"]),
        failed=strings["failed"],
        is_query=optional["is_query"].astype(bool) if "is_query" in optional else None,
        is_gallery=optional["is_gallery"].astype(bool) if "is_gallery" in optional else None,
        item_ids=strings.get("item_ids"),
    )
