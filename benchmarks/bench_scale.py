"""Catalogue indexes at scale: build time, memory and search latency of each index kind against
exact (flat) search on the same vectors, measured in the same run, then projected to 100M.

Synthetic clustered unit vectors (ten to a centre, like a few photos of each item), generated in
blocks. For every size: the index ``ascension index --kind K`` would build (``plan_index``),
its build seconds, the bytes FAISS stores for it (what it holds in memory) next to our estimate,
single-query latency (median and p95 over ``--queries`` queries, one at a time) and its recall@10
against exact search on held-out vectors. hnsw is measured up to ``--hnsw-max`` items (its build
is the slowest). The projection fits a power law (value = a * n^b) through the two largest
measured sizes of each kind and states b.

    python benchmarks/bench_scale.py                 # 100k, 1M and 5M vectors, 256-d
    python benchmarks/bench_scale.py --quick         # 20k and 100k
    python benchmarks/bench_scale.py --maintenance   # changes in place at 1M (--quick: 20k)
    python benchmarks/bench_scale.py --store milvus  # a folder and Milvus at 1M (--quick: 20k)

``--maintenance`` measures a catalogue kept in place instead: a catalogue folder of that many
vectors (ten photos an item, a thousand classes) is written once (the time to build it again
from vectors already embedded: a lower bound of a rebuild, which would embed every photo too),
then 1 % of its items are removed and 1 % relabelled through the store, each timed as a user
waits for it (the new generation written and the onboarding check of what a relabel touched),
and each compared with the rebuild measured in the same run.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
from _common import benchmark_parser, print_table, write_json

PROJECT_TO = 100_000_000


def clustered(count: int, dim: int, seed: int = 0, block: int = 1 << 18) -> np.ndarray:
    """``count`` unit vectors, ten to a random centre, built block by block (no 2x copy)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, count // 10), dim), dtype=np.float32)
    vectors = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, block):
        stop = min(count, start + block)
        rows = vectors[start:stop]
        rows[:] = centres[rng.integers(0, len(centres), stop - start)]
        rows += 0.35 * rng.standard_normal((stop - start, dim), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return vectors


def latency(index, queries: np.ndarray) -> tuple[float, float]:
    """(median, p95) milliseconds of one-query searches for the top 10."""
    times = []
    for row in queries:
        started = time.perf_counter()
        index.search(row[None, :], 10)
        times.append(1000 * (time.perf_counter() - started))
    return float(np.median(times)), float(np.percentile(times, 95))


def measure(vectors: np.ndarray, kind: str, queries: np.ndarray, recall_sample: int) -> dict:
    import faiss

    from ascension_cli.retrieval.index import build_index, plan_index, recall_against_exact

    plan = plan_index(len(vectors), vectors.shape[1], kind)
    started = time.perf_counter()
    index = build_index(vectors, kind, use_gpu=False, plan=plan)
    build = time.perf_counter() - started
    stored = len(faiss.serialize_index(index))
    median, p95 = latency(index, queries)
    recall, sample, held_out = (1.0, 0, False) if kind == "flat" else recall_against_exact(
        index, vectors, plan, k=10, sample=recall_sample)
    del index
    gc.collect()
    return {"kind": kind, "count": len(vectors), "plan": plan.describe(),
            "build_seconds": build, "stored_bytes": stored, "estimated_bytes": plan.memory_bytes,
            "bytes_per_vector": stored / len(vectors), "latency_ms_median": median,
            "latency_ms_p95": p95, "recall_at_10_vs_exact": recall, "recall_sample": sample,
            "recall_held_out": held_out}


def power_law(sizes: list[int], values: list[float]) -> tuple[float, float]:
    """(a, b) of value = a * n^b through the points, least squares on logarithms."""
    b, log_a = np.polyfit(np.log(sizes), np.log(np.maximum(values, 1e-12)), 1)
    return float(np.exp(log_a)), float(b)


def project(rows: list[dict]) -> dict:
    """Each kind's build time, memory and latency at PROJECT_TO from its two largest measured
    sizes, where the per-item costs outweigh the fixed ones (quantizer training on a sample of
    at most 50 per list, thread start-up) that a fit through small sizes would extrapolate."""
    projected = {}
    for kind in dict.fromkeys(row["kind"] for row in rows):
        mine = sorted((row for row in rows if row["kind"] == kind),
                      key=lambda row: row["count"])[-2:]
        if len(mine) < 2:
            continue
        sizes = [row["count"] for row in mine]
        entry = {}
        for key in ("build_seconds", "stored_bytes", "latency_ms_median"):
            a, b = power_law(sizes, [row[key] for row in mine])
            entry[key] = a * PROJECT_TO**b
            entry[key + "_exponent"] = b
        projected[kind] = entry
    return projected


def main() -> None:
    parser = benchmark_parser(__doc__, __file__)
    parser.add_argument("--sizes", type=int, nargs="+", help="catalogue sizes "
                        "(default 100000 1000000 5000000; --quick 20000 100000)")
    parser.add_argument("--dim", type=int, default=256, help="vector dimension (default 256)")
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivfpq", "ivf", "hnsw"])
    parser.add_argument("--hnsw-max", type=int, default=1_000_000,
                        help="largest size hnsw is built at (default 1000000)")
    parser.add_argument("--queries", type=int, default=200, help="single-query searches timed")
    parser.add_argument("--recall-sample", type=int, default=500)
    parser.add_argument("--rows-from", type=Path, help="print and project the measured rows of "
                        "an earlier run's JSON instead of measuring")
    parser.add_argument("--maintenance", action="store_true",
                        help="time removing and relabelling 1 %% of the items against a rebuild")
    parser.add_argument("--store", choices=["milvus"],
                        help="compare a folder catalogue with one in Milvus (a Milvus Lite "
                        "server started here): build, latency, queries/s, service memory")
    parser.add_argument("--milvus", metavar="HOST:PORT",
                        help="with --store milvus: a Milvus server to measure instead of a "
                        "Milvus Lite one started here")
    args = parser.parse_args()
    if args.store == "milvus":
        size = (args.sizes or [20_000 if args.quick else 1_000_000])[0]
        stores(size, args.dim, args.queries, args.json, args.milvus)
        return
    if args.maintenance:
        size = (args.sizes or [20_000 if args.quick else 1_000_000])[0]
        maintenance(size, args.dim, args.kinds[0], args.json)
        return
    sizes = args.sizes or ([20_000, 100_000] if args.quick else [100_000, 1_000_000, 5_000_000])
    if args.rows_from is not None:
        earlier = json.loads(args.rows_from.read_text())
        report(earlier["results"], earlier["dim"], earlier["sizes"], args.json)
        return
    report(measure_all(sizes, args), args.dim, sizes, args.json)


def measure_all(sizes: list[int], args) -> list[dict]:
    rows = []
    for size in sizes:
        vectors = clustered(size, args.dim)
        queries = clustered(args.queries, args.dim, seed=1)  # new photos: not in the catalogue
        for kind in args.kinds:
            if kind == "hnsw" and size > args.hnsw_max:
                continue
            row = measure(vectors, kind, queries, args.recall_sample)
            rows.append(row)
            print(f"{size:>10,} {kind:6} built in {row['build_seconds']:.1f} s", flush=True)
        del vectors
        gc.collect()
    return rows


def report(rows: list[dict], dim: int, sizes: list[int], json_path: Path | None) -> None:
    flat = {row["count"]: row for row in rows if row["kind"] == "flat"}
    table = []
    for row in rows:
        base = flat.get(row["count"])
        row["latency_vs_flat"] = base and row["latency_ms_median"] / base["latency_ms_median"]
        row["memory_vs_flat"] = base and row["stored_bytes"] / base["stored_bytes"]
        table.append([
            f"{row['count']:,}", row["kind"], f"{row['build_seconds']:.1f}",
            f"{row['stored_bytes'] / 2**20:.0f} ({row['estimated_bytes'] / 2**20:.0f})",
            f"{row['memory_vs_flat']:.3f}" if base else "-",
            f"{row['latency_ms_median']:.2f} / {row['latency_ms_p95']:.2f}",
            f"{row['latency_vs_flat']:.3f}" if base else "-",
            f"{row['recall_at_10_vs_exact']:.3f}",
        ])
    print_table(f"indexes of {dim}-d clustered vectors (same run; ratios against flat)",
                ["items", "kind", "build s", "MiB (estimate)", "memory/flat",
                 "ms median / p95", "latency/flat", "recall@10"], table)
    projected = project(rows)
    print_table(f"projected to {PROJECT_TO:,} items (power law a*n^b through the two largest "
                "measured sizes)",
                ["kind", "build", "memory", "latency ms", "b (build, memory, latency)"],
                [[kind, f"{p['build_seconds'] / 3600:.1f} h",
                  f"{p['stored_bytes'] / 2**30:.1f} GiB", f"{p['latency_ms_median']:.1f}",
                  f"{p['build_seconds_exponent']:.2f}, {p['stored_bytes_exponent']:.2f}, "
                  f"{p['latency_ms_median_exponent']:.2f}"]
                 for kind, p in projected.items()])
    write_json("bench_scale", {
        "dim": dim, "sizes": sizes, "results": rows, "projected_to": PROJECT_TO,
        "projection_model": "power law value = a * n^b through the two largest measured sizes "
                            "of each kind",
        "projected": projected,
    }, json_path)


def stores(size: int, dim: int, queries: int, json_path: Path | None,
           server_at: str | None = None) -> None:
    """A folder catalogue and a Milvus one of the same vectors, in one run (``_stores.py``)."""
    from _stores import compare_stores

    rows = compare_stores(size, dim, clustered(queries, dim, seed=1), clustered(size, dim),
                          latency, server_at=server_at)
    folder = rows[0]
    server = f"the Milvus server at {server_at}" if server_at else "Milvus Lite"
    print_table(f"a catalogue of {size:,} {dim}-d vectors in a folder and in {server} (same "
                "run; ratios against the folder)",
                ["store", "build s", "ms median / p95", "at Strong", "q/s 1 client",
                 "q/s 16 clients", "service MiB", "service memory / folder"],
                [[r["store"], f"{r['build_seconds']:.1f}",
                  f"{r['latency_ms_median']:.2f} / {r['latency_ms_p95']:.2f}",
                  f"{r['strong_latency_ms_median']:.2f} / {r['strong_latency_ms_p95']:.2f}"
                  if "strong_latency_ms_median" in r else "-",
                  f"{r['qps_1']:.0f}", f"{r['qps_16']:.0f}", f"{r['service_mib']:.0f}",
                  f"{r['service_mib'] / folder['service_mib']:.2f}"] for r in rows])
    write_json("bench_scale_stores", {"size": size, "dim": dim, "server": server_at or
                                      "Milvus Lite, started here", "results": rows}, json_path)


def maintenance(size: int, dim: int, kind: str, json_path: Path | None) -> None:
    """Time a rebuild, a removal and a relabel of 1 % of the items, in one run."""
    import tempfile

    from ascension_cli.catalog.edit import Relabel, Selection
    from ascension_cli.catalog.folder_store import FolderStore
    from ascension_cli.catalog.history import change
    from ascension_cli.catalog.store import Catalog, write_catalog
    from ascension_cli.model.backbone import build_model

    model, spec = build_model("test_convnext", pretrained=False, image_size=32)
    vectors = clustered(size, dim)
    items = [f"item-{row // 10}" for row in range(size)]
    labels = np.array([(row // 10) % 1000 for row in range(size)], np.int64)
    rng = np.random.default_rng(0)
    chosen = rng.choice(size // 10, 2 * (size // 1000), replace=False)
    removed = tuple(f"item-{i}" for i in chosen[: size // 1000])
    relabelled = tuple(f"item-{i}" for i in chosen[size // 1000:])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        catalog = Catalog(Path(folder) / "cat", spec, "0" * 64, "backbone",
                          [f"class-{c}" for c in range(1000)], vectors, labels,
                          [f"/photos/{row}.jpg" for row in range(size)], dim,
                          {"kind": kind}, item_ids=items)
        started = time.perf_counter()
        write_catalog(catalog, model, change("build", "bench", size, size // 10))
        rebuild = time.perf_counter() - started
        store = FolderStore(catalog.directory)
        for name, run in (
                ("remove 1 % of the items", lambda: store.remove(Selection(items=removed),
                                                                  "bench")),
                ("relabel 1 % of the items", lambda: store.relabel(
                    [Relabel(Selection(items=relabelled), "class-new")], "bench"))):
            started = time.perf_counter()
            changed = run()
            seconds = time.perf_counter() - started
            rows.append({"change": name, "photos": changed.photos, "items": changed.items,
                         "seconds": seconds, "rebuild_seconds": rebuild,
                         "vs_rebuild": seconds / rebuild})
    print_table(f"changes in place, {size:,} {dim}-d vectors, {kind} index (same run; ratio "
                "against writing the catalogue again from its vectors)",
                ["change", "photos", "items", "seconds", "rebuild s", "change/rebuild"],
                [[r["change"], f"{r['photos']:,}", f"{r['items']:,}", f"{r['seconds']:.1f}",
                  f"{r['rebuild_seconds']:.1f}", f"{r['vs_rebuild']:.2f}"] for r in rows])
    write_json("bench_scale_maintenance", {"size": size, "dim": dim, "kind": kind,
                                           "results": rows}, json_path)


if __name__ == "__main__":
    main()
