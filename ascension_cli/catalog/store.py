"""A catalogue of known items on disk: written, read, locked and added to.

A catalogue folder holds everything a search needs, and nothing from the training run (its
files are listed in ``catalog_layout.py``). This module writes and reads them.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ascension_cli.atomic import atomic_write, atomic_write_json
from ascension_cli.catalog.photos import pending, settle
from ascension_cli.catalog_layout import (
    CATALOG_FORMAT,
    CATALOG_JSON,
    CATALOG_LOCK,
    CATALOG_VERSION,
    INDEX_FILE,
    ITEMS_FILE,
    MODEL_FILE,
    STORED_NAME,
    catalog_files,
    catalog_folder,
    generation_file,
    generation_files,
    is_milvus,
    model_file,
)
from ascension_cli.errors import CatalogError, CheckpointError
from ascension_cli.model.backbone import EmbeddingModel, ModelSpec
from ascension_cli.model.checkpoint import load_model_file, save_model_file
from ascension_cli.paths import checked, not_ours
from ascension_cli.retrieval.index import INDEX_KINDS, write_index
from ascension_cli.strings import has_strings, packed, unpacked
from ascension_cli.values import whole

MILVUS_INDEX = "milvus"  # the index kind of a catalogue its Milvus server searches


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
    # Each photo's item (a product, a SKU): a manifest's item_id; None means the default, the
    # photo's class (or, unlabelled, its path), which is what folder trees give.
    item_ids: list[str] | None = None
    # The threshold ``ascension calibrate`` chose, with what it measured (catalog.json keeps it).
    calibration: dict | None = None
    # Why catalog.json's calibration is not used (edited by hand into something unusable).
    calibration_ignored: str | None = None
    # Where the catalogue keeps each photo's bytes, relative to its folder ("" for a photo it
    # only refers to, at its path), and each photo's sha256; None: a catalogue from before it
    # kept them (its photos are where its paths say, unverified).
    stored: list[str] | None = None
    digests: list[str] | None = None
    # The change that wrote this generation, as the history records it (``catalog/history.py``).
    change: dict | None = None
    # Where it is searched when not in a FAISS file of its folder: a Milvus store.
    backend: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def index_kind(self) -> str:
        return self.index.get("kind", "flat")

    def with_vectors(self) -> Catalog:
        """This catalogue with its vectors read from items.npz if it was loaded without them."""
        if self.vectors is not None:
            return self
        if self.backend is not None:  # the same rows, in the same order, with their vectors
            return self.backend.read(with_vectors=True)
        return replace(self, vectors=_read_items(self.directory / self.files["items"], True)[0])

    def class_name(self, label: int) -> str | None:
        return self.class_names[label] if 0 <= label < len(self.class_names) else None

    def item(self, row: int) -> str:
        """The item the photo at ``row`` shows."""
        if self.item_ids is not None:
            return self.item_ids[row]
        return self.class_name(int(self.labels[row])) or self.paths[row]

    def items(self) -> list[str]:
        return [self.item(row) for row in range(len(self))]

    def photo_file(self, row: int) -> Path:
        """Where the photo at ``row`` is read from: the catalogue's own copy, else its path."""
        if self.stored is not None and self.stored[row]:
            return self.directory / self.stored[row]
        return Path(self.paths[row])

    @property
    def threshold(self) -> float | None:
        """The calibrated threshold, if the catalogue has one."""
        return None if self.calibration is None else float(self.calibration["threshold"])

    def threshold_for(self, given: float | None) -> float | None:
        """The threshold a search applies: the one ``given``, else the calibrated one."""
        return given if given is not None else self.threshold

    def calibration_note(self) -> str | None:
        """What a user should know of the calibration: that it cannot be used, or that the
        catalogue grew since."""
        if self.calibration_ignored is not None:
            return (f"the calibration in {CATALOG_JSON} is ignored ({self.calibration_ignored}): "
                    "no threshold applies; run `ascension calibrate` again")
        if self.calibration is None or self.calibration.get("items") == len(self):
            return None
        return (f"the catalogue holds {len(self)} photos, {self.calibration.get('items')} when "
                "it was calibrated: run `ascension calibrate` again")


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
            settle_photos(directory)
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
        kept = [meta, *([{"files": meta["previous_files"]}] if meta.get("previous_files")
                        else []), *([meta["rollback"]] if meta.get("rollback") else [])]
        live = {name for record in kept for name in catalog_files(record).values()}
    except (ValueError, AttributeError, TypeError):
        return
    for path in directory.iterdir():
        if generation_file(path.name) and path.name not in live and path.is_file():
            path.unlink(missing_ok=True)


def settle_photos(directory: Path) -> None:
    """Settle the photos of a change that has ended, or stopped before it settled them
    (``photos.py``): those the live generation does not hold go."""
    journal = pending(directory)
    if journal is None:
        return
    meta, held = _live_meta(directory), set()
    if meta is not None:
        stored = _read_items(directory / catalog_files(meta)["items"], False)[3]["stored"]
        held = set(stored or ())
    settle(directory, held, journal)


def write_catalog(catalog: Catalog, model: EmbeddingModel | None,
                  change: dict | None = None, rollback: dict | None = None) -> Catalog:
    """Write the catalogue as a new generation, catalog.json last (atomically): a crash at any
    instant leaves the previous catalogue whole. The caller holds ``catalog_lock``. ``model``
    None keeps the model file as it is (a new catalogue's goes to model.pt, a new model of an
    existing one to model-NNNNNN.pt); ``change``: the history's entry for this change, kept in
    catalog.json with the generation it made; ``rollback``: the catalog.json an upgrade
    replaces, kept (with its files) until the next change. An approximate index's recall
    against exact search is measured on held-out items and recorded. Returns the catalogue as
    written."""
    directory = catalog.directory
    directory.mkdir(parents=True, exist_ok=True)
    catalog = catalog.with_vectors()
    generation = catalog.generation + 1
    files = {**generation_files(generation), "model": catalog.files.get("model", MODEL_FILE)}
    if model is not None:
        exists = (directory / CATALOG_JSON).exists()
        files["model"] = model_file(generation) if exists else MODEL_FILE
        save_model_file(directory / files["model"], model, catalog.spec)
    atomic_write(directory / files["items"], lambda handle: np.savez(
        handle, vectors=catalog.vectors, labels=catalog.labels,
        **packed("paths", catalog.paths),
        **{name: array for field_name in ("item_ids", "stored", "digests")
           if (values := getattr(catalog, field_name)) is not None
           for name, array in packed(field_name, values).items()}))
    catalog = replace(catalog, dim=int(catalog.vectors.shape[1]), generation=generation,
                      index=write_index(directory / files["index"], catalog.vectors,
                                        catalog.index_kind))
    previous = catalog.files if (directory / CATALOG_JSON).exists() else {}
    if change is not None:
        change = {**change, "from_generation": generation - 1, "to_generation": generation}
    # Written last: it names the generation, and its count vouches for the files.
    atomic_write_json(directory / CATALOG_JSON, {
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
        **({} if catalog.calibration is None else {"calibration": catalog.calibration}),
        **({} if change is None else {"change": change}),
        **({} if rollback is None else {"rollback": rollback}),
    })
    _remove_leftovers(directory)
    return replace(catalog, files=files, change=change)


OPTIONAL_STRINGS = ("item_ids", "stored", "digests")  # lists an items file may lack


def _read_items(path: Path, vectors: bool) -> tuple[np.ndarray | None, np.ndarray, list,
                                                   dict[str, list | None]]:
    """(vectors or None, labels, paths, {item_ids, stored, digests}: each a list or None) from
    an items file; npz members are read only when asked. FileNotFoundError passes (a writer may
    have just replaced the generation)."""
    try:
        with np.load(path, allow_pickle=False) as items:
            return (items["vectors"] if vectors else None, items["labels"],
                    unpacked(items, "paths"),
                    {name: unpacked(items, name) if has_strings(items, name) else None
                     for name in OPTIONAL_STRINGS})
    except FileNotFoundError:
        raise
    except Exception:  # numpy and zipfile raise many kinds for a damaged archive
        raise _damaged(path) from None


def load_catalog(directory: str | Path, with_vectors: bool = True) -> Catalog:
    """Read and check a catalogue folder (or a Milvus catalogue, by its location);
    ``with_vectors=False`` leaves the vectors on disk (a search needs the index, labels and
    paths only)."""
    if is_milvus(directory):
        from ascension_cli.catalog.milvus_store import MilvusStore

        return MilvusStore(str(directory)).read(with_vectors)
    try:
        return _load_catalog(Path(directory), with_vectors)
    except FileNotFoundError:  # a writer replaced the generation between two reads: read again
        return _load_catalog(Path(directory), with_vectors)


def _load_catalog(directory: Path, with_vectors: bool) -> Catalog:
    directory = checked(catalog_folder, directory, CatalogError)
    try:
        meta = json.loads((directory / CATALOG_JSON).read_text(encoding="utf-8"))
        files = catalog_files(meta)
        spec = ModelSpec.from_dict(meta["model"])
        if (problem := _meta_problem(meta)) is not None:
            raise ValueError(problem)
    except Exception:
        raise _damaged(directory / CATALOG_JSON) from None
    # A catalogue written before catalog.json recorded the dimension: read it off the vectors.
    vectors, labels, paths, lists = _read_items(directory / files["items"],
                                                with_vectors or "dimension" not in meta)
    counts = {meta.get("count"), len(labels), len(paths)}
    counts.update(len(values) for values in lists.values() if values is not None)
    if lists["stored"] is not None and any(not _own_photo(name) for name in lists["stored"]):
        raise _damaged(directory / files["items"])
    if vectors is not None:
        counts.add(len(vectors))
    dim = meta["dimension"] if "dimension" in meta else vectors.shape[1]
    if (len(counts) != 1 or labels.dtype.kind not in "iu" or labels.ndim != 1
            or (len(labels) and not -1 <= labels.min() <= labels.max() < len(meta["class_names"]))
            or (vectors is not None and (vectors.ndim != 2 or vectors.shape[1] != dim))):
        raise CatalogError(f"catalogue {directory} is inconsistent (its files do not agree); "
                           "build it again with `ascension index`")
    return Catalog(directory, spec, meta["checkpoint_sha256"], meta["feature_kind"],
                   list(meta["class_names"]), vectors, labels, paths, int(dim),
                   dict(meta.get("index") or {"kind": "flat"}), int(meta.get("generation", 0)),
                   files, lists["item_ids"], *_calibration(meta), lists["stored"],
                   lists["digests"], meta.get("change"))


def _own_photo(name: str) -> bool:
    """Whether an items file's ``stored`` entry names a file the catalogue keeps (or none): a
    name ``photos.py`` writes, never a path out of the folder."""
    return name == "" or bool(STORED_NAME.fullmatch(name))


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with catalog.json's fields (a file edited by hand), or None."""
    names = meta.get("class_names")
    counts = {key: meta.get(key, 0) for key in ("count", "dimension", "generation")}
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)
            and len(set(names)) == len(names)):
        return "class_names must be distinct names"
    if not all(whole(value) for value in counts.values()):
        return "count, dimension and generation must be whole numbers from 0"
    if meta.get("feature_kind") not in ("backbone", "head"):
        return "feature_kind must be backbone or head"
    if not isinstance(meta.get("checkpoint_sha256"), str):
        return "checkpoint_sha256 must be text"
    index = meta.get("index") or {}
    if not isinstance(index, dict) or index.get("kind", "flat") not in INDEX_KINDS:
        return f"index must name a kind of {', '.join(INDEX_KINDS)}"
    if not isinstance(meta.get("change", {}), dict):
        return "change must be a record of the last change"
    return None


def _calibration(meta: dict) -> tuple[dict | None, str | None]:
    """catalog.json's calibration if it holds a usable one (a threshold, a number from -1 to
    1), else None and why it is ignored (None too when there is none)."""
    if meta.get("calibration") is None:
        return None, None
    found = meta["calibration"]
    threshold = found.get("threshold") if isinstance(found, dict) else None
    if (isinstance(threshold, int | float) and not isinstance(threshold, bool)
            and -1 <= threshold <= 1):  # NaN compares false
        return found, None
    return None, f"its threshold, {str(threshold)[:40]}, is not a number from -1 to 1"


def write_calibration(catalog: Catalog, calibration: dict) -> Catalog:
    """Record a calibration in catalog.json, rewritten atomically (the files it names stay):
    a crash leaves the catalogue as it was or calibrated. The caller holds ``catalog_lock``
    and has read ``catalog`` under it."""
    path = catalog.directory / CATALOG_JSON
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["calibration"] = calibration
    atomic_write_json(path, meta)
    return replace(catalog, calibration=calibration)


def _damaged(path: Path) -> CatalogError:
    return CatalogError(str(not_ours(path, "part of an Ascension catalogue",
                                     "build the catalogue again with `ascension index`")))


def load_catalog_model(catalog: Catalog) -> EmbeddingModel:
    path = catalog.directory / catalog.files.get("model", MODEL_FILE)
    try:
        return load_model_file(path)
    except CheckpointError:
        raise _damaged(path) from None


def load_index(catalog: Catalog) -> faiss.Index:
    """The catalogue's index: its FAISS file, or what searches its Milvus collection."""
    if catalog.backend is not None:
        return catalog.backend.index(catalog)
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
