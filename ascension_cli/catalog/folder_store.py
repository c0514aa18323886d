"""The one interface through which the commands and the service change a catalogue: read, add,
remove, relabel, replace, history and snapshot (build, calibrate, upgrade and rollback commit
through ``writing`` and ``commit`` too). ``FolderStore`` keeps a catalogue in a folder of FAISS
files (``store.py``); another kind of store implements the same methods, and the commands and
the service do not change.

Every change runs under the catalogue's writer lock, writes one new generation whose
catalog.json carries the change's history entry (one atomic commit), then appends the entry to
``history.jsonl`` and settles the photos it wrote or dropped (``photos.py``). A kill -9 at any
instant leaves the catalogue as it was before the change or after it, with nothing orphaned
once the next writer has settled.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascension_cli.atomic import atomic_write
from ascension_cli.catalog.check import nearest_other_class
from ascension_cli.catalog.edit import (
    Relabel,
    Selection,
    append_items,
    relabelled,
    selected_rows,
    without_rows,
)
from ascension_cli.catalog.history import change, read_history, record, record_pending
from ascension_cli.catalog.photos import begin, keep_bytes, keep_files
from ascension_cli.catalog.store import (
    Catalog,
    catalog_lock,
    load_catalog,
    settle_photos,
    write_calibration,
    write_catalog,
)
from ascension_cli.catalog_layout import (
    CATALOG_JSON,
    HISTORY_FILE,
    MODEL_FILE,
    catalog_folder,
    is_milvus,
)
from ascension_cli.errors import CatalogError, DataError, Refused


@dataclass(frozen=True)
class Changed:
    """What a change did: the catalogue after it, the photos and items it touched, and for each
    item it touched its nearest item of another class (``check.nearest_other_class``)."""

    catalog: Catalog
    photos: int
    items: int
    nearest: list[dict]

    def to_dict(self) -> dict:
        from ascension_cli.catalog.check import confusable_of

        return {"photos": self.photos, "items": self.items, "total": len(self.catalog),
                "generation": self.catalog.generation, "nearest": self.nearest,
                "confusable": confusable_of(self.nearest)}


class FolderStore:
    """A catalogue kept in a folder (``catalog_layout.py``)."""

    def __init__(self, location: str | Path):
        self.directory = Path(location)

    def read(self, with_vectors: bool = True) -> Catalog:
        return load_catalog(self.directory, with_vectors)

    @property
    def name(self) -> str:
        return str(self.directory)

    def exists(self) -> bool:
        return (self.directory / CATALOG_JSON).exists()

    def stamp(self) -> tuple[int, int]:
        """What changes at every change: catalog.json, written last, is rewritten."""
        stat = (self.directory / CATALOG_JSON).stat()
        return stat.st_mtime_ns, stat.st_size

    def home(self, shared: Path | None = None) -> Path:
        """Where a new catalogue keeps its model and photos: its folder."""
        return self.directory

    def begin(self, writes: bool, dropped: list[str] = ()) -> None:
        """Journal the photos a change writes and drops (``photos.begin``)."""
        begin(self.directory, writes, dropped)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """The right to change the catalogue (one writer at a time, across processes); a
        change's photos are settled when it ends, however it ends."""
        with catalog_lock(self.directory):
            record_pending(self.directory)
            try:
                yield
            finally:
                self._settle()

    def _settle(self) -> None:
        settle_photos(self.directory)

    def commit(self, catalog: Catalog, entry: dict, model=None,
               touched: np.ndarray | None = None) -> Catalog:
        """Write ``catalog`` as the next generation with its history ``entry`` (a folder's
        generation holds every row: ``touched``, the rows a change rewrote, is for stores that
        write rows one by one); the caller is inside ``writing``."""
        written = write_catalog(catalog, model, entry)
        record_pending(self.directory)
        return written

    # ---- changes
    def remove(self, selection: Selection, by: str) -> Changed:
        """Take the selected photos (or whole items) out of the catalogue."""
        with self.writing():
            catalog = self.read()
            rows = selected_rows(catalog, selection)
            if len(rows) == len(catalog):
                raise Refused("a change cannot remove every photo: build another catalogue, "
                                "or remove this folder")
            items = len({catalog.item(row) for row in rows})
            self.begin(False, _stored_at(catalog, rows))
            written = self.commit(without_rows(catalog, rows),
                                  change("remove", by, len(rows), items))
        return Changed(written, len(rows), items, [])

    def relabel(self, changes: list[Relabel], by: str) -> Changed:
        """File each change's photos under its class and/or item id, in one change."""
        if not changes or any(c.class_name is None and c.item_id is None for c in changes):
            raise DataError("a relabel needs a new class, a new item id, or both")
        with self.writing():
            catalog = self.read()
            changed, rows = relabelled(catalog, changes)
            items = len({catalog.item(row) for row in rows})
            details = {} if len(changes) > 1 else {
                key: value for key, value in (("class", changes[0].class_name),
                                              ("item", changes[0].item_id))
                if value is not None}
            written = self.commit(changed, change("relabel", by, len(rows), items, **details),
                                  touched=rows)
            return Changed(written, len(rows), items, nearest_other_class(written, rows))

    def add_decoded(self, uploads: list[tuple[bytes, str, np.ndarray]], class_name: str,
                    by: str, searcher=None, **embed_options) -> Changed:
        """Keep each upload (its bytes, a suffix, the image decoded from them) as a photo of
        ``class_name`` and add it; what the model could not embed is dropped. ``searcher``: one
        already loaded (a service's), used when its model is the catalogue's."""
        with self.writing():
            catalog = self.read()
            searcher = _searcher_for(catalog, searcher)
            home = catalog.directory  # where its photos are kept
            self.begin(True)
            kept = [keep_bytes(home, data, suffix) for data, suffix, _ in uploads]
            vectors, indices = searcher.embed_decoded([image for *_, image in uploads],
                                                      **embed_options)
            names = [kept[i][0] for i in indices]
            catalog = append_items(
                catalog, vectors, [class_name] * len(indices),
                [home / name for name in names], classes=[class_name],
                kept=(names, [kept[i][1] for i in indices]))
            written = self.commit(catalog, change("add", by, len(indices), 1 if len(indices)
                                                  else 0, **{"class": class_name}))
            return Changed(written, len(indices), int(bool(len(indices))),
                           nearest_other_class(written, len(written) - len(indices)))

    def replace(self, photo: str, new_photo: Path | tuple[bytes, str, np.ndarray], by: str,
                searcher=None, **embed_options) -> Changed:
        """Put a new photo (a file, or an upload's bytes, suffix and decoded image) in place of
        ``photo``: the same class and item, the new photo's vector (``searcher`` as for
        ``add_decoded``)."""
        with self.writing():
            catalog = self.read()
            rows = selected_rows(catalog, Selection(photos=(photo,)))
            row = int(rows[0])
            searcher = _searcher_for(catalog, searcher)
            self.begin(True, _stored_at(catalog, rows))
            vectors, kept, path = _embedded_one(catalog.directory, searcher, new_photo,
                                                embed_options)
            rest = without_rows(catalog, rows)
            grown = append_items(
                rest, vectors, [catalog.class_name(int(catalog.labels[row]))], [path],
                item_ids=None if catalog.item_ids is None else [catalog.item(row)], kept=kept)
            written = self.commit(grown, change("replace", by, len(rows), 1))
            return Changed(written, len(rows), 1, nearest_other_class(written, len(written) - 1))

    def calibrate(self, catalog: Catalog, calibration: dict, entry: dict) -> Catalog:
        """Record a calibration measured on ``catalog`` (refused if it changed meanwhile) in
        catalog.json, then in the history."""
        with catalog_lock(self.directory):
            current = load_catalog(self.directory, with_vectors=False)
            if current.generation != catalog.generation:
                raise CatalogError(f"the catalogue in {self.directory} changed during "
                                   "calibration; run `ascension calibrate` again")
            written = write_calibration(current, calibration)
            record(self.directory, {**entry, "from_generation": current.generation,
                                    "to_generation": current.generation})
            return written

    # ---- reading the record, copying the whole
    def history(self) -> list[dict]:
        return read_history(self.directory)

    def snapshot(self, destination: str | Path) -> Path:
        """A copy of the catalogue as it is now that loads on its own; taken under the writer
        lock (searches go on, changes wait), its catalog.json written last."""
        destination = Path(destination)
        if destination.exists() and any(destination.iterdir()):
            raise CatalogError(f"{destination} is not empty: a snapshot goes into a new folder")
        with self.writing():
            catalog = self.read(with_vectors=False)
            names = [MODEL_FILE, *catalog.files.values(), HISTORY_FILE,
                     *sorted({name for name in catalog.stored or () if name})]
            for name in names:
                source = self.directory / name
                if source.is_file():
                    _copy(source, destination / name)
            _copy(self.directory / CATALOG_JSON, destination / CATALOG_JSON)
        catalog_folder(destination)
        return destination


def _searcher_for(catalog: Catalog, loaded=None):
    """What embeds a change's new photos: ``loaded`` (a service's searcher, its model in
    memory) when it has the catalogue's model and features, else one loaded now."""
    from ascension_cli.catalog.search import CatalogSearcher

    if loaded is not None and (loaded.catalog.checkpoint_sha256, loaded.catalog.feature_kind) == (
            catalog.checkpoint_sha256, catalog.feature_kind):
        return loaded
    return CatalogSearcher(catalog)


def _stored_at(catalog: Catalog, rows: np.ndarray) -> list[str]:
    return [] if catalog.stored is None else [catalog.stored[row] for row in rows]


def _embedded_one(directory: Path, searcher, new_photo, embed_options: dict):
    """(its vector, (stored names, digests), its path) of one new photo, kept in the
    catalogue; ``DataError`` when it cannot be read."""
    if isinstance(new_photo, tuple):
        data, suffix, image = new_photo
        vectors, indices = searcher.embed_decoded([image], **embed_options)
        name, digest = keep_bytes(directory, data, suffix)
        path = directory / name
    else:
        path = Path(new_photo)
        vectors, indices = searcher.embed([path], **embed_options)
        if len(indices):
            names, digests = keep_files(directory, [path], "copy")
            name, digest = names[0], digests[0]
    if not len(indices):
        raise DataError("the new photo cannot be read as an image" + (
            "" if isinstance(new_photo, tuple) else f": {new_photo}"))
    return vectors, ([name], [digest]), path


def _copy(source: Path, target: Path) -> None:
    """Copy one file atomically (a snapshot interrupted leaves no half-written file)."""
    with open(source, "rb") as handle:
        atomic_write(target, lambda out: shutil.copyfileobj(handle, out))
    os.utime(target, (source.stat().st_atime, source.stat().st_mtime))


def store_of(location: str | Path, shared: str | Path | None = None):
    """The store a catalogue's location names: a folder (``FolderStore``) or
    milvus://HOST:PORT/COLLECTION (``MilvusStore``; ``shared``: where a new one keeps its
    model and photos)."""
    if is_milvus(location):
        from ascension_cli.catalog.milvus_store import MilvusStore

        return MilvusStore(str(location), shared)
    return FolderStore(location)


__all__ = ["Changed", "FolderStore", "Selection", "store_of"]
