"""``bench_scale.py --store milvus``: a catalogue of N clustered vectors in a folder (FAISS) and
in a Milvus collection (a Milvus Lite server started here, on 127.0.0.1), measured in the same
run: the time to build each, single-query search latency (p50 / p95), queries a second at 1
and 16 clients, and the memory a service process holds for each (a process that loads the
catalogue as ``ascension serve`` does, its resident memory over a bare one's)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROWS_SERVED = """
import json, sys
from ascension_cli.catalog.search import CatalogSearcher
from ascension_cli.catalog.store import load_catalog
def rss():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                if l.startswith("VmRSS"))
import ascension_cli.catalog.milvus_store  # every module a service has, loaded first
bare = rss()
searcher = CatalogSearcher(load_catalog(sys.argv[1], with_vectors=False))
searcher.index.search(__import__("numpy").zeros((1, searcher.catalog.dim), "float32"), 10)
print(json.dumps({"mib": rss() - bare}))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _milvus(data: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("milvus-lite")), "server", "--host", "127.0.0.1",
         "--port", str(port), "--data-dir", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server, f"127.0.0.1:{port}"
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("Milvus Lite did not start")


def _catalogue(folder: Path, vectors: np.ndarray):
    from ascension_cli.catalog.store import Catalog
    from ascension_cli.model.backbone import build_model

    model, spec = build_model("test_convnext", pretrained=False, image_size=32)
    size = len(vectors)
    catalog = Catalog(folder, spec, "0" * 64, "backbone", [f"class-{c}" for c in range(1000)],
                      vectors, np.arange(size, dtype=np.int64) // 10 % 1000,
                      [f"/photos/{row}.jpg" for row in range(size)], vectors.shape[1],
                      {"kind": "flat"}, item_ids=[f"item-{row // 10}" for row in range(size)])
    return catalog, model


def _throughput(index, queries: np.ndarray, clients: int, seconds: float) -> float:
    """Queries a second that ``clients`` threads get, each searching one query at a time."""
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def client(number: int) -> None:
        rng = np.random.default_rng(number)
        while time.perf_counter() < stop:
            index.search(queries[rng.integers(len(queries))][None, :], 10)
            done[number] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / seconds


def _served_mib(location: str) -> float:
    found = subprocess.run([sys.executable, "-c", ROWS_SERVED, location], capture_output=True,
                           text=True, check=True)
    return json.loads(found.stdout.strip().splitlines()[-1])["mib"]


def _strong(index, queries: np.ndarray, latency) -> dict:
    """A Milvus index's latency at Strong consistency too, beside the guarantee timestamp a
    catalogue's searches use (``milvus_store._Index``); nothing for a folder, or for a server
    that gives no timestamps (Milvus Lite: searched at Strong already)."""
    if getattr(index, "consistency", {}).get("consistency_level") != "Customized":
        return {}
    chosen = index.consistency
    index.consistency = {"consistency_level": "Strong"}
    try:
        p50, p95 = latency(index, queries[:50])
    finally:
        index.consistency = chosen
    return {"strong_latency_ms_median": p50, "strong_latency_ms_p95": p95}


def compare_stores(size: int, dim: int, queries: np.ndarray, vectors: np.ndarray,
                   latency, seconds: float = 5.0, server_at: str | None = None) -> list[dict]:
    """Both stores built from ``vectors`` and measured in one run (see the module notes);
    ``server_at``: HOST:PORT of a Milvus server to use instead of starting Milvus Lite."""
    from ascension_cli.catalog.history import change
    from ascension_cli.catalog.milvus_store import MilvusStore
    from ascension_cli.catalog.store import load_catalog, load_index, write_catalog

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        server, address = (None, server_at) if server_at else _milvus(work / "milvus")
        try:
            location = f"milvus://{address}/bench_{int(time.time())}"
            for store, target in (("folder", str(work / "cat")), ("milvus", location)):
                catalog, model = _catalogue(work / ("cat" if store == "folder" else "shared"),
                                            vectors)
                entry = change("build", "bench", size, size // 10)
                started = time.perf_counter()
                if store == "folder":
                    write_catalog(catalog, model, entry)
                else:
                    MilvusStore(location, work / "shared").commit(catalog, entry, model)
                built = time.perf_counter() - started
                index = load_index(load_catalog(target, with_vectors=False))
                p50, p95 = latency(index, queries)
                rows.append({"store": store, "count": size, "dim": dim, "build_seconds": built,
                             "latency_ms_median": p50, "latency_ms_p95": p95,
                             "qps_1": _throughput(index, queries, 1, seconds),
                             "qps_16": _throughput(index, queries, 16, seconds),
                             "service_mib": _served_mib(target), **_strong(index, queries,
                                                                            latency)})
                print(f"{store:7} built in {built:.1f} s", flush=True)
        finally:
            if server is not None:
                server.kill()
                server.wait(timeout=30)
    return rows
