"""A catalogue in a Milvus collection (``milvus://HOST:PORT/COLLECTION``), for a chain whose
catalogue outgrows one machine: any number of services, on any machines, answer from one
collection, and a write through one is seen by the next search through any other.

What lives where:

- the collection: one row per photo (its vector, path, item, class, where the shared store keeps
  it and its sha256), keyed by the photo's content, item and path, so a write retried after a
  crash adds nothing twice; and, in its properties, the catalogue's facts (model identity,
  feature kind, classes, calibration) with a stamp that every write renews;
- the shared store (``--shared``, a folder every service machine reaches): the model and the
  photos, each checked by its sha256 when read (``catalog/photos.py`` names them);
- the history: a second collection, ``COLLECTION_history``, one row per change.

A write records, with its new stamp, the server's timestamp of its last row written; a search
asks the server for the rows as of that timestamp (Milvus's "customized" consistency): every
write acknowledged before the facts it read is visible, which is what "the next search through
any other service" needs, without Strong consistency's wait for the server's next time tick
(about 0.3 s a search on a Milvus 2.3 standalone; see docs/scale.md). A server that does not
say its timestamps (Milvus Lite) is searched at Strong consistency. Every call to
the server is bounded by ``TIMEOUT``; a server that is down, slow or restarting is a
``CatalogError`` (the service answers 503) and the next call connects again. The credentials
and TLS settings come from the environment (``catalog/milvus_connection.py``) and never appear
in a message.

Milvus has no lock that holds across machines: two writers at once each land whole, and the
last one's stamp wins (a service reads the catalogue again at every new stamp).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from ascension_cli.catalog.folder_store import FolderStore
from ascension_cli.catalog.milvus_collections import (
    HISTORY_SUFFIX,
    SEARCH_BREADTH,
    TEXT,
    create,
    generation_name,
    keep_model,
    last_write,
    read_history,
    record,
    server_index,
)
from ascension_cli.catalog.milvus_connection import (
    TLS_VARIABLE,
    TOKEN_VARIABLE,
    client_for,
    forget,
)
from ascension_cli.catalog.milvus_shared import refuse_writes_over_http, shared_home
from ascension_cli.catalog.photos import file_digest
from ascension_cli.catalog.store import MILVUS_INDEX, Catalog
from ascension_cli.catalog_layout import MilvusLocation
from ascension_cli.errors import CatalogError, ConfigError, Refused
from ascension_cli.model.backbone import ModelSpec

TIMEOUT = 10.0  # seconds a call to the server may take
META = "ascension"  # the collection property that holds the catalogue's facts
FORMAT, VERSION = "ascension-milvus", 1
BATCH = 5000  # rows a write sends (and a read asks for) at once
MAX_LIMIT = 16384  # results one Milvus search returns, at most


def _released(exc: Exception) -> bool:
    """Whether the server refused a call because the collection is not loaded."""
    return getattr(exc, "code", None) == 101 or "call load()" in str(exc)


def row_key(digest: str, item: str, path: str) -> str:
    """A photo's key: its content, its item and its path. The same add again (a retry after a
    crash: the same files, or the same uploads, which are kept under their content's name)
    gives the same keys and adds nothing twice; copies of a photo at two paths are two rows,
    as in a folder catalogue."""
    return hashlib.sha256(f"{digest}\0{item}\0{path}".encode("utf-8", "surrogatepass")
                          ).hexdigest()


class _Index:
    """The collection searched as a FAISS index is (``retrieval.index.search`` calls
    ``search(x, k)``): each hit's row in the catalogue as it was read, -1 for a row written
    since (the service reads the catalogue again at the new stamp)."""

    def __init__(self, store: MilvusStore, catalog: Catalog, keys: list[str],
                 written_at: int = 0):
        self.store, self.ntotal, self.d = store, len(catalog), catalog.dim
        self.rows = {key: row for row, key in enumerate(keys)}
        self.params = dict(catalog.index.get("search") or {})
        self.consistency = ({"consistency_level": "Customized",
                             "guarantee_timestamp": written_at} if written_at > 0
                            else {"consistency_level": "Strong"})

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        limit = min(k, MAX_LIMIT)
        params = {key: max(value, limit) if key in SEARCH_BREADTH else value
                  for key, value in self.params.items()}  # a graph searched at least k wide
        hits = self.store.call("search", self.store.location.collection,
                               data=[q.tolist() for q in queries], limit=limit,
                               output_fields=["key"], **self.consistency,
                               search_params={"metric_type": "IP", "params": params})
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for number, found in enumerate(hits):
            for rank, hit in enumerate(found[:k]):
                ids[number, rank] = self.rows.get(hit["entity"]["key"], -1)
                scores[number, rank] = hit["distance"]
        return scores, ids


class MilvusStore(FolderStore):
    """A catalogue in a Milvus collection. It keeps ``FolderStore``'s changes (remove, relabel,
    add, replace: functions from one catalogue to the next) and replaces where they are read
    from and written to."""

    def __init__(self, location: str, shared: str | Path | None = None):
        self.location = MilvusLocation.parse(str(location))
        self.directory = None  # no folder: the collection, and the shared store
        self.shared = None if shared is None else Path(shared)
        self._client = None
        self._keys: list[str] = []  # each row's key, as the catalogue was last read
        self._written_at = 0  # the server's timestamp of the last row written (0: unknown)

    # ---- the connection
    def client(self):
        if self._client is None:
            # pymilvus logs what it works around (a client-side timestamp for an iterator); the
            # command line and the service say what matters in their own words.
            for name in list(logging.root.manager.loggerDict):
                if name.startswith("pymilvus"):
                    logging.getLogger(name).setLevel(logging.CRITICAL)
            try:
                self._client = client_for(self.location.host, self.location.port, TIMEOUT)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - pymilvus raises many kinds
                raise self._unreachable(exc, connecting=True) from None
        return self._client

    def call(self, method: str, *args, **kwargs):
        """One call to the server, bounded in time; a failure is one CatalogError (and the
        next call connects again). A restarted server holds its collections released: they
        are loaded again, once, and the call repeated."""
        for attempt in (1, 2):
            try:
                return getattr(self.client(), method)(*args, timeout=TIMEOUT, **kwargs)
            except (CatalogError, ConfigError):
                raise
            except Exception as exc:  # noqa: BLE001 - grpc and pymilvus errors alike
                if attempt == 1 and _released(exc):
                    _load_collections(self)
                    continue
                forget(self._client)  # the next call connects again
                self._client = None
                raise self._unreachable(exc) from None
        raise AssertionError("unreachable")

    def _unreachable(self, exc: Exception, connecting: bool = False) -> CatalogError:
        return unreachable(self.location, exc, connecting)

    @property
    def name(self) -> str:
        return str(self.location)

    def home(self) -> Path:
        """Where a new catalogue keeps its model and photos: the shared store."""
        if self.shared is None:
            raise Refused("a Milvus catalogue needs --shared DIR: where its model and photos "
                          "are kept")
        self.shared.mkdir(parents=True, exist_ok=True)
        return self.shared.resolve()

    def begin(self, writes: bool, dropped: list[str] = ()) -> None:
        """Photos in the shared store are named by their content: a write cut short leaves at
        most a photo no row names, which the next write of it reuses."""
        if writes:
            refuse_writes_over_http()

    # ---- reading
    def meta(self) -> dict:
        if not self.call("has_collection", self.location.collection):
            raise CatalogError(f"{self.location} holds no catalogue (no such collection); "
                               "build one with `ascension index ... -o LOCATION --shared DIR`")
        properties = self.call("describe_collection", self.location.collection).get(
            "properties") or {}
        try:
            meta = json.loads(properties[META])
            ours = meta["format"] == FORMAT and meta["version"] == VERSION
        except (KeyError, ValueError, TypeError):
            ours = False
        if not ours:
            raise CatalogError(f"{self.location} is not an Ascension catalogue (or one of a "
                               "version this Ascension does not read)")
        return meta

    def stamp(self) -> str:
        """What changes at every write: a service reads the catalogue again when it does."""
        return str(self.meta().get("stamp"))

    def exists(self) -> bool:
        return bool(self.call("has_collection", self.location.collection))

    def _rows(self, with_vectors: bool) -> list[dict]:
        fields = [*TEXT, *(["vector"] if with_vectors else [])]
        iterator = self.call("query_iterator", self.location.collection, batch_size=BATCH,
                             output_fields=fields, consistency_level="Strong")
        rows = []
        try:
            while batch := iterator.next():
                rows.extend(batch)
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable(exc) from None
        finally:
            iterator.close()
        rows.sort(key=lambda row: row["key"])  # a stable order across reads
        return rows

    def read(self, with_vectors: bool = True) -> Catalog:
        """The catalogue as it is in the collection now."""
        meta = self.meta()
        rows = self._rows(with_vectors)  # a service searches on the server: none needed
        names = list(meta["class_names"])
        position = {name: label for label, name in enumerate(names)}
        for row in rows:
            if row["label"] and row["label"] not in position:
                position[row["label"]] = len(names)
                names.append(row["label"])
        dim = int(meta["dimension"])
        vectors = (np.array([row["vector"] for row in rows], np.float32).reshape(-1, dim)
                   if with_vectors else None)
        catalog = Catalog(
            shared_home(str(self.location), meta["shared"], meta["model_file"],
                        meta.get("model_sha256")),
            ModelSpec.from_dict(meta["model"]), meta["checkpoint_sha256"],
            meta["feature_kind"], names, vectors,
            np.array([position[row["label"]] if row["label"] else -1 for row in rows],
                     np.int64), [row["path"] for row in rows], dim,
            {**meta.get("index", {}), "kind": MILVUS_INDEX},
            int(meta.get("generation", 1)), {"model": meta["model_file"]},
            [row["item"] for row in rows],
            meta.get("calibration"), None, [row["stored"] for row in rows],
            [row["digest"] for row in rows])
        self._keys = [row["key"] for row in rows]
        self._written_at = int(meta.get("written_at") or 0)
        return replace(catalog, backend=self)  # searched on the server (``index``)

    def index(self, catalog: Catalog) -> _Index:
        return _Index(self, catalog, self._keys, self._written_at)

    def _wrote(self, collection: str) -> None:
        self._written_at = max(self._written_at, last_write(self, collection))

    # ---- writing
    @contextmanager
    def writing(self) -> Iterator[None]:
        """No lock holds across machines: each write is idempotent and lands whole."""
        yield

    def _write_rows(self, catalog: Catalog, rows: np.ndarray,
                    collection: str | None = None, new: bool = False) -> None:
        """Write ``rows`` of ``catalog``: upserted (a row written twice is held once), or into
        a ``new`` collection, which no one else writes yet, inserted (far faster)."""
        items = catalog.items()
        stored = catalog.stored or [""] * len(catalog)
        digests = catalog.digests or [""] * len(catalog)
        texts = [{"key": row_key(digests[row], items[row], catalog.paths[row]),
                  "path": catalog.paths[row], "item": items[row],
                  "label": catalog.class_name(int(catalog.labels[row])) or "",
                  "stored": stored[row], "digest": digests[row]} for row in rows]
        too_long = [name for text in texts for name, limit in TEXT.items()
                    if len(text[name].encode("utf-8", "surrogatepass")) > limit]
        if too_long:
            raise Refused(f"a photo's {too_long[0]} is longer than a Milvus catalogue keeps "
                          f"({TEXT[too_long[0]]} bytes)")
        collection = collection or self.location.collection
        for start in range(0, len(texts), BATCH):  # vectors as lists one batch at a time
            vectors = catalog.vectors[rows[start:start + BATCH]].tolist()
            self.call("insert" if new else "upsert", collection,
                      [{**text, "vector": vector}
                       for text, vector in zip(texts[start:start + BATCH], vectors, strict=True)])
        self._wrote(collection)  # the last write's timestamp: every batch's is below it

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), BATCH):
            self.call("delete", self.location.collection, ids=keys[start:start + BATCH])
        self._wrote(self.location.collection)

    def _write_meta(self, catalog: Catalog, collection: str | None = None, **extra) -> None:
        meta = {"format": FORMAT, "version": VERSION, "model": catalog.spec.to_dict(),
                "checkpoint_sha256": catalog.checkpoint_sha256,
                "feature_kind": catalog.feature_kind, "class_names": catalog.class_names,
                "dimension": catalog.dim if catalog.vectors is None
                else int(catalog.vectors.shape[1]), "shared": str(catalog.directory),
                "model_file": catalog.files["model"],
                "model_sha256": file_digest(catalog.directory / catalog.files["model"]),
                "calibration": catalog.calibration,
                "index": {key: value for key, value in catalog.index.items() if key != "kind"},
                "stamp": uuid.uuid4().hex, "written_at": self._written_at, **extra}
        self.call("alter_collection_properties", collection or self.location.collection,
                  properties={META: json.dumps(meta)})

    def commit(self, catalog: Catalog, entry: dict, model=None,
               touched: np.ndarray | None = None) -> Catalog:
        """Write the rows the collection lacks (and the ``touched`` ones again), then drop the
        rows ``catalog`` lacks, then the facts (a new stamp), then the history's row. Writes
        before deletes: a write cut short leaves a row twice at worst, never none, and the
        same write again (or the next change) puts it right."""
        if model is not None:
            catalog = keep_model(catalog, model)
        live = self.meta() if self.exists() else {}
        self._written_at = max(self._written_at, int(live.get("written_at") or 0))
        if not live:
            index = server_index(catalog.index.get("kind", "flat"), len(catalog),
                                 int(catalog.vectors.shape[1]))
            first = generation_name(self.location.collection, 1)
            create(self, first, int(catalog.vectors.shape[1]), index)
            self.call("create_alias", first, self.location.collection)
            catalog = replace(catalog, index={**index, "kind": MILVUS_INDEX})
            self._keys = []
        items, digests = catalog.items(), catalog.digests or [""] * len(catalog)
        keys = [row_key(digests[r], items[r], catalog.paths[r]) for r in range(len(catalog))]
        held = set(self._keys)
        again = set() if touched is None else {int(row) for row in touched}
        rows = np.array([r for r, key in enumerate(keys) if key not in held or r in again],
                        np.int64)
        self._write_rows(catalog, rows, new=not live)
        self._delete(sorted(held - set(keys)))
        self._write_meta(catalog, generation=live.get("generation", 1))
        if live.get("rollback"):  # a change ends the way back of an upgrade
            self.call("drop_collection", live["rollback"]["collection"])
        self._record(entry)
        self._keys = keys
        return replace(catalog, backend=self)

    # ---- the history
    def _record(self, entry: dict) -> None:
        record(self, entry)

    def calibrate(self, catalog: Catalog, calibration: dict, entry: dict) -> Catalog:
        """Record a calibration in the collection's facts (a new stamp), then the history."""
        calibrated = replace(catalog, calibration=calibration)
        live = self.meta()
        self._write_meta(calibrated, **{key: live[key] for key in
                                        ("generation", "rollback", "written_at") if key in live})
        self._record(entry)
        return calibrated

    def snapshot(self, destination: str | Path) -> Path:
        raise Refused("a Milvus collection is backed up with Milvus's own tools (a backup of "
                      "the collection and of the shared store), not `catalog snapshot`")

    def history(self) -> list[dict]:
        self.meta()  # a catalogue, or one line saying there is none
        return read_history(self)


def unreachable(location: MilvusLocation, exc: Exception, connecting: bool) -> CatalogError:
    """One line, naming no credential: a refused connection looks the same from here whether
    the server is down or refused this machine's credential or TLS settings."""
    hint = (f"is the server up, and are {TOKEN_VARIABLE} and {TLS_VARIABLE} right for it?"
            if connecting else "is the server up?")
    return CatalogError(f"the Milvus catalogue {location} cannot be read now "
                        f"({type(exc).__name__}); {hint}")


def _load_collections(store: MilvusStore) -> None:
    """Load the catalogue's collections again (a restarted server holds them released)."""
    for name in (store.location.collection, store.location.collection + HISTORY_SUFFIX):
        try:
            store.client().load_collection(name, timeout=TIMEOUT)
        except Exception:  # noqa: BLE001 - one that does not exist stays so
            continue
