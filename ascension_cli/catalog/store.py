"""A searchable catalogue of known items: "which item is this photo?".

A catalogue folder holds everything a search needs, and nothing from the training run:

    catalog.json        format, model identity (spec, checkpoint sha256), feature kind, class
                        names, the index's kind, shape and measured recall against exact search,
                        and the live generation's file names
    model.pt            the model's weights and spec (weights_only-loadable), to embed queries
    items-NNNNNN.npz    vectors, labels and absolute paths of the catalogued images
    index-NNNNNN.faiss  an inner-product FAISS index over the vectors: exact (flat), or hnsw,
                        ivf or ivfpq for millions of items
    uploads/            photos added through ``serve`` (``POST /items``)

Every change writes a new generation of items and index files, then catalog.json, atomically,
naming it: a kill -9 at any instant leaves the old catalogue or the new one, whole. The previous
generation stays for readers that opened it a moment ago; older ones are removed. Writers take
an exclusive lock on the folder (``CATALOG_LOCK``), across processes.

A search reads the index, labels and paths, not the vectors: an ivfpq catalogue of millions
searches in a fraction of the memory its vectors would take.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from ascension_cli.atomic import atomic_write, atomic_write_text
from ascension_cli.data.cache import available_memory
from ascension_cli.data.dataset import Failed
from ascension_cli.data.manifest import scan_any
from ascension_cli.embed.images import embed_images, write_index
from ascension_cli.embed.vectors import sha256_of
from ascension_cli.errors import AscensionError, CheckpointError, DataError
from ascension_cli.model.backbone import EmbeddingModel, ModelSpec
from ascension_cli.model.checkpoint import load_model, load_model_file, save_model_file
from ascension_cli.paths import (
    CATALOG_FORMAT,
    CATALOG_JSON,
    CATALOG_LOCK,
    CATALOG_VERSION,
    INDEX_FILE,
    ITEMS_FILE,
    MODEL_FILE,
    UPLOAD_NAME,
    UPLOADS_FOLDER,
    catalog_files,
    catalog_folder,
    checked,
    generation_file,
    generation_files,
    not_ours,
)
from ascension_cli.retrieval.index import check_fits, plan_index, search


class CatalogError(AscensionError):
    """A catalogue is missing, inconsistent, empty, or from another model."""


@dataclass
class Catalog:
    directory: Path
    spec: ModelSpec
    checkpoint_sha256: str
    feature_kind: str
    class_names: list[str]
    vectors: np.ndarray | None  # None when loaded for searching only (see ``with_vectors``)
    labels: np.ndarray
    paths: list[str]
    dim: int = 0
    index: dict = field(default_factory=lambda: {"kind": "flat"})  # as catalog.json says
    generation: int = 0  # 0: none written yet
    files: dict = field(default_factory=lambda: {"items": ITEMS_FILE, "index": INDEX_FILE})

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def index_kind(self) -> str:
        return self.index.get("kind", "flat")

    def with_vectors(self) -> Catalog:
        """This catalogue with its vectors read from items.npz if it was loaded without them."""
        if self.vectors is not None:
            return self
        return replace(self, vectors=_read_items(self.directory / self.files["items"], True)[0])

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


@contextmanager
def catalog_lock(directory: Path) -> Iterator[None]:
    """Exclusive right to change the catalogue in ``directory``, across threads and processes
    (``serve --workers N``, ``index --add`` beside a running service). Leftovers of a writer
    that died (temporary files, generations no catalog.json names) are removed on taking it.
    A folder that does not exist yet holds nothing to protect: it is not made here."""
    if not directory.is_dir():
        yield
        return
    with open(directory / CATALOG_LOCK, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            _remove_leftovers(directory)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _live_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / CATALOG_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _remove_leftovers(directory: Path) -> None:
    """Remove a dead writer's temporary files and the generations that neither catalog.json
    nor its previous generation names (the previous one stays for readers that opened it a
    moment ago). Only names a catalogue writer makes are touched."""
    meta = _live_meta(directory)
    if meta is None:
        return
    try:
        live = set(catalog_files(meta).values()) | set(meta.get("previous_files", {}).values())
    except (ValueError, AttributeError, TypeError):
        return
    for path in directory.iterdir():
        if generation_file(path.name) and path.name not in live and path.is_file():
            path.unlink(missing_ok=True)


def remove_orphan_uploads(catalog: Catalog) -> int:
    """Remove photos under uploads/ that the catalogue does not hold (an add interrupted
    between writing them and committing); how many. Only files named as ``serve`` names an
    added photo are touched, matched by name, so a moved catalogue keeps its photos."""
    uploads = catalog.directory / UPLOADS_FOLDER
    if not uploads.is_dir():
        return 0
    held = {Path(path).name for path in catalog.paths}
    removed = 0
    for path in uploads.rglob("*"):
        orphan = UPLOAD_NAME.fullmatch(path.name) and path.name not in held
        half_written = path.name.startswith(".") and path.name.endswith(".tmp")
        if (orphan or half_written) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_catalog(catalog: Catalog, model: EmbeddingModel | None) -> Catalog:
    """Write the catalogue as a new generation, catalog.json last (atomically): a crash at any
    instant leaves the previous catalogue whole. The caller holds ``catalog_lock``. ``model``
    None keeps the model file as it is. An approximate index's recall against exact search is
    measured on held-out items and recorded. Returns the catalogue as written."""
    directory = catalog.directory
    directory.mkdir(parents=True, exist_ok=True)
    catalog = catalog.with_vectors()
    if model is not None:
        save_model_file(directory / MODEL_FILE, model, catalog.spec)
    generation = catalog.generation + 1
    files = generation_files(generation)
    atomic_write(directory / files["items"], lambda handle: np.savez(
        handle, vectors=catalog.vectors, labels=catalog.labels,
        paths=np.array(catalog.paths, dtype=str)))
    catalog = replace(catalog, dim=int(catalog.vectors.shape[1]), generation=generation,
                      index=write_index(directory / files["index"], catalog.vectors,
                                        catalog.index_kind))
    previous = catalog.files if (directory / CATALOG_JSON).exists() else {}
    # Written last: it names the generation, and its count vouches for the files.
    atomic_write_text(directory / CATALOG_JSON, json.dumps({
        "format": CATALOG_FORMAT,
        "version": CATALOG_VERSION,
        "model": catalog.spec.to_dict(),
        "checkpoint_sha256": catalog.checkpoint_sha256,
        "feature_kind": catalog.feature_kind,
        "class_names": catalog.class_names,
        "count": len(catalog),
        "dimension": catalog.dim,
        "index": catalog.index,
        "generation": generation,
        "files": files,
        "previous_files": previous,
    }, indent=2) + "\n")
    _remove_leftovers(directory)
    return replace(catalog, files=files)


def _read_items(path: Path, vectors: bool) -> tuple[np.ndarray | None, np.ndarray, list]:
    """(vectors or None, labels, paths) from an items file; npz members are read only when
    asked. FileNotFoundError passes (a writer may have just replaced the generation)."""
    try:
        with np.load(path, allow_pickle=False) as items:
            return (items["vectors"] if vectors else None, items["labels"],
                    items["paths"].tolist())
    except FileNotFoundError:
        raise
    except Exception:  # numpy and zipfile raise many kinds for a damaged archive
        raise _damaged(path) from None


def load_catalog(directory: str | Path, with_vectors: bool = True) -> Catalog:
    """Read and check a catalogue folder; ``with_vectors=False`` leaves the vectors on disk
    (a search needs the index, labels and paths only)."""
    try:
        return _load_catalog(Path(directory), with_vectors)
    except FileNotFoundError:  # a writer replaced the generation between two reads: read again
        return _load_catalog(Path(directory), with_vectors)


def _load_catalog(directory: Path, with_vectors: bool) -> Catalog:
    directory = checked(catalog_folder, directory, CatalogError)
    try:
        meta = json.loads((directory / CATALOG_JSON).read_text(encoding="utf-8"))
        files = catalog_files(meta)
    except Exception:
        raise _damaged(directory / CATALOG_JSON) from None
    # A catalogue written before catalog.json recorded the dimension: read it off the vectors.
    vectors, labels, paths = _read_items(directory / files["items"],
                                         with_vectors or "dimension" not in meta)
    counts = {meta.get("count"), len(labels), len(paths)}
    if vectors is not None:
        counts.add(len(vectors))
    if len(counts) != 1:
        raise CatalogError(f"catalogue {directory} is inconsistent (its files do not agree); "
                           "build it again with `ascension index`")
    dim = meta["dimension"] if "dimension" in meta else vectors.shape[1]
    return Catalog(directory, ModelSpec.from_dict(meta["model"]), meta["checkpoint_sha256"],
                   meta["feature_kind"], list(meta["class_names"]), vectors, labels, paths,
                   int(dim), dict(meta.get("index") or {"kind": "flat"}),
                   int(meta.get("generation", 0)), files)


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
    path = catalog.directory / catalog.files["index"]
    try:
        index = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    except FileNotFoundError:
        raise
    except Exception:
        raise _damaged(path) from None
    if index.ntotal != len(catalog) or index.d != catalog.dim:
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
    index_kind: str | None = None,
    **embed_options,
) -> tuple[Catalog, int]:
    """Create a catalogue, or with ``add`` append the images it does not hold yet.

    Returns the catalogue and how many images were added. Labels come from class folders or a
    manifest (only ``split``'s rows when given; a flat folder gives -1); new class names are
    appended to the catalogue's list. ``index_kind`` (default: flat, or the catalogue's own with
    ``add``) is checked against the memory available before anything is embedded.
    """
    directory = Path(directory)
    model, spec, _ = load_model(checkpoint)
    with catalog_lock(directory):
        catalog = _open_for_build(directory, spec, sha256_of(checkpoint), feature_kind, add)
        if index_kind is not None:
            catalog = replace(catalog, index={"kind": index_kind})
        before = len(catalog)
        _append_new(catalog, scan_any(gallery_root, split), model, spec, feature_kind,
                    on_failed, embed_options)
        if len(catalog) == 0:
            raise DataError(f"no readable images in {gallery_root}: the catalogue would be "
                            "empty")
        return write_catalog(catalog, model if not add else None), len(catalog) - before


def _append_new(catalog: Catalog, scan, model: EmbeddingModel, spec: ModelSpec,
                feature_kind: str, on_failed, embed_options: dict) -> None:
    """Embed the images of ``scan`` that ``catalog`` does not hold yet and append them (and
    their new classes), once the index they make is known to fit the memory available."""
    known = set(catalog.paths)
    fresh = [i for i, path in enumerate(scan.paths) if path.resolve().as_posix() not in known]
    _check_memory(len(catalog) + len(fresh), spec.feature_dim(feature_kind), catalog.index_kind)
    if not fresh:
        return
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


def _open_for_build(
    directory: Path, spec: ModelSpec, checkpoint_sha: str, feature_kind: str, add: bool
) -> Catalog:
    """The catalogue to extend (same model and features required), or a new empty one."""
    if not add:
        if (directory / CATALOG_JSON).exists():
            raise CatalogError(f"{directory} already holds a catalogue: pass --add to extend "
                               "it, or choose another --output")
        return Catalog(directory, spec, checkpoint_sha, feature_kind, [],
                       np.zeros((0, 0), np.float32), np.zeros(0, np.int64), [])
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
    return catalog


def _check_memory(count: int, dim: int, index_kind: str) -> None:
    """Refuse, before embedding, an index that would not fit the memory available."""
    try:
        check_fits(plan_index(count, dim, index_kind), available_memory())
    except ValueError as exc:
        raise CatalogError(str(exc)) from None


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
        how many were readable. Searches meanwhile use the catalogue as it was. The caller
        holds ``catalog_lock`` and has read the catalogue under it."""
        vectors, indices = self.embed(paths, **embed_options)
        catalog = self.catalog.with_vectors()
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
