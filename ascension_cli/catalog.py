"""A searchable catalogue of known items: "which item is this photo?".

A catalogue folder holds everything a search needs, and nothing from the training run:

    catalog.json   format, model identity (spec, checkpoint sha256), feature kind, class names
    model.pt       the model's weights and spec (weights_only-loadable), to embed query photos
    items.npz      vectors, labels and absolute paths of the catalogued images
    index.faiss    an exact inner-product FAISS index over the vectors
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from ascension_cli.atomic import atomic_write, atomic_write_text
from ascension_cli.checkpoint import load_model, load_model_file, save_model_file
from ascension_cli.data.dataset import Failed
from ascension_cli.data.manifest import scan_any
from ascension_cli.embedding import embed_images, write_index
from ascension_cli.errors import AscensionError, CheckpointError, DataError
from ascension_cli.model import EmbeddingModel, ModelSpec
from ascension_cli.paths import (
    CATALOG_FORMAT,
    CATALOG_JSON,
    CATALOG_VERSION,
    INDEX_FILE,
    ITEMS_FILE,
    MODEL_FILE,
    catalog_folder,
    checked,
    not_ours,
)
from ascension_cli.retrieval.index import search
from ascension_cli.vectors import sha256_of


class CatalogError(AscensionError):
    """A catalogue is missing, inconsistent, empty, or from another model."""


@dataclass
class Catalog:
    directory: Path
    spec: ModelSpec
    checkpoint_sha256: str
    feature_kind: str
    class_names: list[str]
    vectors: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def class_name(self, label: int) -> str | None:
        return self.class_names[label] if 0 <= label < len(self.class_names) else None


@dataclass
class Match:
    path: str
    class_name: str | None
    similarity: float
    id: int = -1  # the item's row in the catalogue


@dataclass
class SearchResult:
    query: str
    matches: list[Match] = field(default_factory=list)
    predicted: str | None = None  # None: unknown (nothing close enough) or no labelled match
    score: float = 0.0  # the predicted class's share of the similarity-weighted vote
    unknown: bool = False

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "predicted": self.predicted,
            "score": self.score,
            "unknown": self.unknown,
            "matches": [
                {"id": m.id, "path": m.path, "class": m.class_name, "similarity": m.similarity}
                for m in self.matches
            ],
        }


def write_catalog(catalog: Catalog, model: EmbeddingModel | None) -> None:
    """Write the catalogue's files, each atomically, catalog.json last (its count vouches for
    the others); ``model`` None keeps the model file as it is."""
    directory = catalog.directory
    directory.mkdir(parents=True, exist_ok=True)
    if model is not None:
        save_model_file(directory / MODEL_FILE, model, catalog.spec)
    atomic_write(directory / ITEMS_FILE, lambda handle: np.savez(
        handle, vectors=catalog.vectors, labels=catalog.labels,
        paths=np.array(catalog.paths, dtype=str)))
    write_index(directory / INDEX_FILE, catalog.vectors)
    # Written last: its count vouches for the other files.
    atomic_write_text(directory / CATALOG_JSON, json.dumps({
        "format": CATALOG_FORMAT,
        "version": CATALOG_VERSION,
        "model": catalog.spec.to_dict(),
        "checkpoint_sha256": catalog.checkpoint_sha256,
        "feature_kind": catalog.feature_kind,
        "class_names": catalog.class_names,
        "count": len(catalog),
    }, indent=2) + "\n")


def load_catalog(directory: str | Path) -> Catalog:
    """Read and check a catalogue folder."""
    directory = checked(catalog_folder, Path(directory), CatalogError)
    try:
        meta = json.loads((directory / CATALOG_JSON).read_text(encoding="utf-8"))
        with np.load(directory / ITEMS_FILE, allow_pickle=False) as items:
            vectors, labels = items["vectors"], items["labels"]
            paths = items["paths"].tolist()
    except Exception:  # numpy and zipfile raise many kinds for a damaged archive
        raise _damaged(directory / ITEMS_FILE) from None
    if not (meta.get("count") == len(vectors) == len(labels) == len(paths)):
        raise CatalogError(f"catalogue {directory} is inconsistent (an interrupted write?); "
                           "build it again with `ascension index`")
    return Catalog(directory, ModelSpec.from_dict(meta["model"]), meta["checkpoint_sha256"],
                   meta["feature_kind"], list(meta["class_names"]), vectors, labels, paths)


def _damaged(path: Path) -> CatalogError:
    return CatalogError(str(not_ours(path, "part of an Ascension catalogue",
                                     "build the catalogue again with `ascension index`")))


def load_catalog_model(catalog: Catalog) -> EmbeddingModel:
    path = catalog.directory / MODEL_FILE
    try:
        return load_model_file(path)
    except CheckpointError:
        raise _damaged(path) from None


def _load_index(catalog: Catalog) -> faiss.Index:
    path = catalog.directory / INDEX_FILE
    try:
        index = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    except Exception:
        raise _damaged(path) from None
    if index.ntotal != len(catalog) or index.d != catalog.vectors.shape[1]:
        raise CatalogError(f"catalogue {catalog.directory} is inconsistent: rebuild it")
    return index


def build_catalog(
    checkpoint: str | Path,
    gallery_root: str | Path,
    directory: str | Path,
    add: bool = False,
    feature_kind: str = "backbone",
    on_failed: Callable[[Failed], None] | None = None,
    split: str | None = None,
    **embed_options,
) -> tuple[Catalog, int]:
    """Create a catalogue, or with ``add`` append the images it does not hold yet.

    Returns the catalogue and how many images were added. Labels come from class folders or a
    manifest (only ``split``'s rows when given; a flat folder gives -1); new class names are appended to the catalogue's list.
    """
    directory = Path(directory)
    checkpoint_sha = sha256_of(checkpoint)
    if add:
        catalog = load_catalog(directory)
        if catalog.checkpoint_sha256 != checkpoint_sha:
            raise CatalogError(
                f"the catalogue in {directory} was built with another model (checkpoint sha256 "
                f"{catalog.checkpoint_sha256[:12]}…, this one {checkpoint_sha[:12]}…); "
                "its vectors would not be comparable"
            )
        if catalog.feature_kind != feature_kind:
            raise CatalogError(f"the catalogue holds {catalog.feature_kind} features, not "
                               f"{feature_kind}")
    elif (directory / CATALOG_JSON).exists():
        raise CatalogError(f"{directory} already holds a catalogue: pass --add to extend it, or "
                           "choose another --output")
    model, spec, _ = load_model(checkpoint)
    if not add:
        catalog = Catalog(directory, spec, checkpoint_sha, feature_kind, [],
                          np.zeros((0, 0), np.float32), np.zeros(0, np.int64), [])

    scan = scan_any(gallery_root, split)
    known = set(catalog.paths)
    fresh = [i for i, path in enumerate(scan.paths) if path.resolve().as_posix() not in known]
    if fresh:
        for name in scan.classes:
            if name not in catalog.class_names:
                catalog.class_names.append(name)
        remap = np.array([catalog.class_names.index(n) for n in scan.classes] + [-1], np.int64)
        paths = [scan.paths[i] for i in fresh]
        vectors, _, indices = embed_images(model, spec, paths, None, feature_kind=feature_kind,
                                           on_failed=on_failed, **embed_options)
        if len(indices):
            labels = remap[scan.labels[fresh][indices]]  # -1 indexes the flat-folder slot
            catalog.vectors = (vectors if len(catalog) == 0
                               else np.concatenate([catalog.vectors, vectors]))
            catalog.labels = np.concatenate([catalog.labels, labels])
            catalog.paths = catalog.paths + [paths[i].resolve().as_posix() for i in indices]
    if len(catalog) == 0:
        raise DataError(f"no readable images in {gallery_root}: the catalogue would be empty")
    write_catalog(catalog, model if not add else None)
    return catalog, len(catalog) - len(known)


def vote(matches: list[Match]) -> tuple[str | None, float]:
    """Similarity-weighted vote over the labelled matches: (class, its share of the vote)."""
    weights: dict[str, float] = {}
    for match in matches:
        if match.class_name is not None:
            weights[match.class_name] = weights.get(match.class_name, 0.0) + max(
                match.similarity, 0.0)
    total = sum(weights.values())
    if not weights or total <= 0:
        return None, 0.0
    best = max(weights, key=weights.get)
    return best, weights[best] / total


class CatalogSearcher:
    """A catalogue with its model and index loaded once, for many searches (``serve``)."""

    def __init__(self, catalog: Catalog):
        if len(catalog) == 0:
            raise CatalogError(f"the catalogue in {catalog.directory} is empty")
        self.catalog = catalog
        self.model = load_catalog_model(catalog)
        self.index = _load_index(catalog)

    def embed(self, query_paths: list[Path], on_failed: Callable[[Failed], None] | None = None,
              **embed_options) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, indices into ``query_paths``) of the readable query images."""
        vectors, _, indices = embed_images(
            self.model, self.catalog.spec, query_paths, None,
            feature_kind=self.catalog.feature_kind, on_failed=on_failed, **embed_options)
        return vectors, indices

    def add(self, paths: list[Path], class_name: str, **embed_options) -> int:
        """Embed the images at ``paths`` as items of ``class_name`` and write the catalogue;
        how many were readable. Searches meanwhile use the catalogue as it was."""
        vectors, indices = self.embed(paths, **embed_options)
        catalog = self.catalog
        if class_name not in catalog.class_names:
            catalog = replace(catalog, class_names=[*catalog.class_names, class_name])
        label = catalog.class_names.index(class_name)
        catalog = replace(
            catalog, vectors=np.concatenate([catalog.vectors, vectors]),
            labels=np.concatenate([catalog.labels, np.full(len(indices), label, np.int64)]),
            paths=catalog.paths + [paths[i].resolve().as_posix() for i in indices])
        write_catalog(catalog, None)
        return len(indices)

    def match(self, vectors: np.ndarray, names: list[str], k: int = 5,
              threshold: float | None = None) -> list[SearchResult]:
        """Top-``k`` items and the voted class of each vector (``names[i]`` its query).

        A query whose best match is less similar than ``threshold`` is marked unknown.
        """
        if len(vectors) == 0:
            return []
        catalog = self.catalog
        ids, scores = search(self.index, vectors, k)
        results = []
        for row, name in enumerate(names):
            matches = [
                Match(catalog.paths[i], catalog.class_name(int(catalog.labels[i])), float(score),
                      int(i))
                for i, score in zip(ids[row], scores[row], strict=True) if i >= 0
            ]
            result = SearchResult(name, matches)
            if threshold is not None and (not matches or matches[0].similarity < threshold):
                result.unknown = True
            else:
                result.predicted, result.score = vote(matches)
            results.append(result)
        return results


def search_catalog(
    catalog: Catalog,
    query_paths: list[Path],
    k: int = 5,
    threshold: float | None = None,
    on_failed: Callable[[Failed], None] | None = None,
    **embed_options,
) -> list[SearchResult]:
    """Top-``k`` catalogue items per readable query image, with a voted class."""
    searcher = CatalogSearcher(catalog)
    vectors, indices = searcher.embed(query_paths, on_failed, **embed_options)
    return searcher.match(vectors, [str(query_paths[i]) for i in indices], k, threshold)
