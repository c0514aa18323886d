"""The collections of a Milvus catalogue (``catalog/milvus_store.py``): the rows' schema and
the server's index for each ``--kind``, the generations an upgrade switches between by moving
the catalogue's alias, and the history's collection.

The location's name is an alias: the rows live in ``NAME__1``, ``NAME__2``... A catalogue is
built into generation 1; an upgrade writes every row, embedded by the new model, into the next
generation and moves the alias to it, so every service reads the new one at its next request;
a rollback moves the alias back to the generation it kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np

from ascension_cli.catalog.history import ACTIONS, change
from ascension_cli.errors import Refused
from ascension_cli.model.checkpoint import save_model_file

TEXT = {"key": 64, "path": 4096, "item": 1024, "label": 512, "stored": 128, "digest": 64}
HISTORY_SUFFIX = "_history"


def generation_name(alias: str, generation: int) -> str:
    return f"{alias}__{generation}"


# The server's index for each --kind, its parameters from the catalogue's size (as a FAISS
# index's are: ``retrieval.index.plan_index``), and how it is searched.
SERVER_INDEX = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ",
                "diskann": "DISKANN"}
HNSW_LINKS, HNSW_BUILD, HNSW_SEARCH = 32, 200, 128
DISKANN_SEARCH = 128  # candidates a DISKANN search keeps (at least the results asked for)
SEARCH_BREADTH = ("ef", "search_list")  # search parameters that must be at least the limit
LITE_VERSION, LITE_LACKS = "milvus_lite", ("IVF_PQ", "DISKANN")  # Milvus Lite builds neither


def server_index(kind: str, count: int, dim: int) -> dict:
    """The Milvus index ``--kind`` names for ``count`` vectors of ``dim``: its type, build and
    search parameters."""
    from ascension_cli.retrieval.index import plan_index

    if kind == "diskann":  # its graph's parameters are the server's own defaults
        return {"server_kind": kind, "type": SERVER_INDEX[kind], "build": {},
                "search": {"search_list": DISKANN_SEARCH}}
    plan = plan_index(max(count, 1), dim, kind)
    build, search = {}, {}
    if kind == "hnsw":
        build, search = {"M": HNSW_LINKS, "efConstruction": HNSW_BUILD}, {"ef": HNSW_SEARCH}
    elif kind in ("ivf", "ivfpq"):
        build, search = {"nlist": plan.lists}, {"nprobe": plan.probes}
        if kind == "ivfpq":
            build.update(m=plan.code_bytes, nbits=8)
    return {"server_kind": kind, "type": SERVER_INDEX[kind], "build": build,
            "search": search}


def create(store, name: str, dim: int, server: dict) -> None:
    """A collection ``name`` of the catalogue's rows, one per photo, searched by inner product
    through the ``server`` index (``server_index``); refused, before anything is made, where
    the server lacks that index."""
    from pymilvus import DataType, MilvusClient

    version = str(store.call("get_server_version"))
    if version.startswith(LITE_VERSION) and server["type"] in LITE_LACKS:
        raise Refused(f"Milvus Lite ({version}) has no {server['type']} index (it would fail "
                      "when it builds one): use a Milvus server, or --kind flat, hnsw or ivf")

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=TEXT["key"])
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    for field, length in TEXT.items():
        if field != "key":
            schema.add_field(field, DataType.VARCHAR, max_length=length)
    index = store.client().prepare_index_params()
    index.add_index(field_name="vector", index_type=server["type"], metric_type="IP",
                    params=server["build"])
    store.call("create_collection", name, schema=schema,
               index_params=index, consistency_level="Strong")


def record(store, entry: dict) -> None:
    """Append a change to the history collection (made on its first change)."""
    from pymilvus import DataType, MilvusClient

    name = store.location.collection + HISTORY_SUFFIX
    if not store.call("has_collection", name):
        schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("at", DataType.DOUBLE)
        schema.add_field("entry", DataType.VARCHAR, max_length=8192)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one
        index = store.client().prepare_index_params()
        index.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        store.call("create_collection", name, schema=schema, index_params=index,
                   consistency_level="Strong")
    store.call("insert", name, [{"at": time.time(), "entry": json.dumps(entry)[:8192],
                                 "vector": [0.0, 0.0]}])


def read_history(store) -> list[dict]:
    """The catalogue's changes, oldest first (none before its first change)."""
    name = store.location.collection + HISTORY_SUFFIX
    if not store.call("has_collection", name):
        return []
    rows = store.call("query", name, filter="id >= 0", output_fields=["at", "entry"],
                      consistency_level="Strong")
    entries = []
    for row in sorted(rows, key=lambda row: row["at"]):
        try:
            entry = json.loads(row["entry"])
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("action") in ACTIONS:
            entries.append(entry)
    return entries


def last_write(store, collection: str) -> int:
    """The server's timestamp of the last write this process made to ``collection`` (what
    pymilvus keeps for Session consistency); 0 where the server gives none (Milvus Lite)."""
    try:
        from pymilvus.client import ts_utils

        written = ts_utils.get_collection_ts(
            collection, store.client()._get_connection().server_address, "")
    except Exception:  # noqa: BLE001 - a pymilvus without it: searches stay Strong
        written = 0
    return int(written or 0)


def keep_model(catalog, model):
    """``catalog`` with ``model`` kept in the shared store, named by its checkpoint's sha256."""
    name = f"models/{catalog.checkpoint_sha256}.pt"
    save_model_file(catalog.directory / name, model, catalog.spec)
    return replace(catalog, files={"model": name})


def switch(store, upgraded, model, entry: dict):
    """Write every row of ``upgraded`` (embedded by ``model``) into the next generation, then
    move the alias to it: every reader switches at its next request. The generation before
    stays for ``rollback``; the one before that goes."""
    live = store.meta()
    alias, generation = store.location.collection, int(live.get("generation", 1))
    target = generation_name(alias, generation + 1)
    if store.call("has_collection", target):  # an interrupted switch's: written again
        store.call("drop_collection", target)
    upgraded = keep_model(upgraded, model)
    dim = int(upgraded.vectors.shape[1])
    server = server_index(live.get("index", {}).get("server_kind", "flat"), len(upgraded), dim)
    create(store, target, dim, server)
    store._write_rows(upgraded, np.arange(len(upgraded)), target, new=True)
    store._write_meta(replace(upgraded, index=server), target, generation=generation + 1,
                      rollback={"collection": generation_name(alias, generation)})
    store.call("alter_alias", target, alias)
    if live.get("rollback"):
        store.call("drop_collection", live["rollback"]["collection"])
    record(store, entry)
    return store.read()


def rollback(store, by: str):
    """Move the alias back to the generation before the last upgrade (its rows, model and
    calibration untouched), and drop the upgraded one."""
    live = store.meta()
    back = live.get("rollback")
    if not isinstance(back, dict) or not store.call("has_collection", back.get("collection")):
        raise Refused("nothing to roll back: the catalogue has not been upgraded since its "
                      "last change")
    alias = store.location.collection
    store.call("alter_alias", back["collection"], alias)
    store.call("drop_collection", generation_name(alias, int(live["generation"])))
    catalog = store.read()
    record(store, change("rollback", by, len(catalog), len(set(catalog.items())),
                         to_checkpoint=catalog.checkpoint_sha256[:16]))
    return catalog
