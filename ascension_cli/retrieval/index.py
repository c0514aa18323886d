"""FAISS index building and chunked k-nearest-neighbour search (inner product on unit vectors).

The searches use the threads the process was given (``OMP_NUM_THREADS``; torchrun gives each
process one) and never set them: FAISS and torch share one OpenMP pool, so setting FAISS's
would also change training's mid-run (after the first validation), which made a resumed run
differ from an uninterrupted one in the last bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from ascension_cli.atomic import atomic_write
from ascension_cli.errors import ConfigError

INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")
HNSW_LINKS = 32  # graph neighbours per vector (M): recall ~0.95+ at efSearch 128
TRAIN_PER_LIST = 50  # vectors the coarse quantizer is trained on, per inverted list
MIN_TRAIN = 10_000  # ... and at least this many (the PQ codebooks need 256 per sub-quantizer)


@dataclass(frozen=True)
class IndexPlan:
    """An index's shape, chosen from the number and dimension of the vectors, with its memory.

    ``lists``: inverted lists of ivf / ivfpq (about sqrt(n), a power of two); ``probes``: lists
    searched per query; ``code_bytes``: bytes per vector of ivfpq (a PQ sub-quantizer per 4
    dimensions at most, 8 bits each); ``train_size``: vectors the quantizers are trained on.
    """

    kind: str
    count: int
    dim: int
    lists: int = 0
    probes: int = 0
    code_bytes: int = 0
    train_size: int = 0

    @property
    def memory_bytes(self) -> int:
        """Bytes the built index holds in memory (FAISS's own layout, ids included)."""
        n, d = self.count, self.dim
        if self.kind == "flat":
            return 4 * n * d
        if self.kind == "hnsw":
            # full vectors + level-0 links (2M int32) + upper levels (~1/M of the vectors, M each)
            return n * (4 * d + 4 * 2 * HNSW_LINKS + 16)
        centroids = 4 * self.lists * d
        if self.kind == "ivf":
            return n * (4 * d + 8) + centroids
        return n * (self.code_bytes + 8) + centroids + 4 * 256 * d

    def _lists(self) -> str:
        return f"{self.lists:,} list{'s' if self.lists != 1 else ''}"

    def describe(self) -> str:
        shape = {
            "flat": "exact",
            "hnsw": f"graph of {HNSW_LINKS} links per vector",
            "ivf": f"{self._lists()}, {self.probes} searched per query",
            "ivfpq": f"{self._lists()}, {self.probes} searched per query, "
                     f"{self.code_bytes}-byte codes",
        }[self.kind]
        trained = f", trained on {self.train_size:,} vectors" if self.train_size else ""
        return f"{self.kind} ({shape}{trained}): about {memory_text(self.memory_bytes)}"


def memory_text(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def _code_bytes(dim: int) -> int:
    """PQ sub-quantizers (a byte each): one per 4 dimensions or fewer, at most 128, dividing
    ``dim``. One per 8 dimensions halves the memory and costs about 0.05-0.2 of recall@10 on
    clustered vectors (measured at 64 and 256 dimensions)."""
    target = max(1, min(128, dim // 4 if dim >= 4 else dim))
    return max(m for m in range(1, target + 1) if dim % m == 0)


def plan_index(count: int, dim: int, index_kind: str = "flat") -> IndexPlan:
    """The index ``build_index`` makes for ``count`` vectors of ``dim``: lists about sqrt(n) (a
    power of two, at least 39 training vectors each), a few percent of them probed."""
    if index_kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {index_kind!r}; choose one of {INDEX_KINDS}")
    if index_kind in ("flat", "hnsw"):
        return IndexPlan(index_kind, count, dim)
    lists = 1 << max(0, int(round(np.log2(max(1.0, np.sqrt(count))))))
    lists = max(1, min(lists, count // 39 or 1))
    probes = max(1, min(lists, max(16, lists // 32)))
    train_size = min(count, max(MIN_TRAIN, TRAIN_PER_LIST * lists))
    code_bytes = _code_bytes(dim) if index_kind == "ivfpq" else 0
    return IndexPlan(index_kind, count, dim, lists, probes, code_bytes, train_size)


MEMORY_SHARE = 0.8  # of the available memory an index build may plan to fill
MIN_IVFPQ = 10_000  # fewer vectors cannot train 256-centroid PQ codebooks well (FAISS: 39 x 256)


def check_fits(plan: IndexPlan, available: int | None) -> None:
    """Raise ConfigError, naming the estimate and what would fit, when building ``plan`` needs
    more than its share of ``available`` bytes (the vectors themselves, plus the index), or when
    ivfpq has too few vectors to train on."""
    if plan.kind == "ivfpq" and plan.count < MIN_IVFPQ:
        raise ConfigError(
            f"{{kind}} ivfpq needs at least {MIN_IVFPQ:,} items to train its codebooks, and "
            f"this catalogue would hold {plan.count:,}: use {{kind}} flat (exact, about "
            f"{memory_text(plan_index(plan.count, plan.dim).memory_bytes)})", options=("kind",))
    if available is None:
        return
    needed = 4 * plan.count * plan.dim + (plan.memory_bytes if plan.kind != "flat" else 0)
    if needed <= MEMORY_SHARE * available:
        return
    smaller = plan_index(plan.count, plan.dim, "ivfpq")
    advice = (f"; {{kind}} ivfpq would need about {memory_text(smaller.memory_bytes)} to search"
              if plan.kind != "ivfpq" else "")
    raise ConfigError(
        f"{plan.count:,} vectors of dimension {plan.dim}: building a {plan.kind} index needs "
        f"about {memory_text(needed)} (the vectors, {memory_text(4 * plan.count * plan.dim)}, "
        f"plus the index), more than {MEMORY_SHARE:.0%} of the {memory_text(available)} "
        f"available{advice}; use a machine with more memory, or embed {{features}} head "
        "(a smaller dimension)", options=("kind", "features"))


def build_index(
    vectors: np.ndarray, index_kind: str = "flat", seed: int = 0, use_gpu: bool = True,
    plan: IndexPlan | None = None,
) -> faiss.Index:
    """An inner-product index over ``vectors`` (float32, L2-normalised rows), shaped by ``plan``
    (default: ``plan_index`` for these vectors).

    ``flat`` is exact. ``hnsw`` (graph), ``ivf`` (inverted lists) and ``ivfpq`` (inverted lists
    of product-quantized codes, a few dozen bytes a vector) are approximate, for galleries past
    about a million vectors; the quantizers are trained on a seeded sample of ``train_size``.
    ``use_gpu`` moves a flat index to the GPU when a GPU build of FAISS is installed (not for an
    index that will be written).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    plan = plan or plan_index(n, dim, index_kind)
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
        index.hnsw.efConstruction = 80
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if plan.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, plan.lists, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, plan.lists, plan.code_bytes, 8,
                                     faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors[training_sample(n, plan.train_size, seed)])
        index.nprobe = plan.probes
        index.quantizer_trains_alone = 0
    if plan.kind == "flat" and use_gpu:
        index = _on_gpu_if_available(index)
    for start in range(0, n, 1 << 18):  # in blocks: no second full-size copy inside FAISS
        index.add(vectors[start:start + (1 << 18)])
    return index


def training_sample(count: int, size: int, seed: int) -> np.ndarray:
    """The rows the quantizers are trained on: a seeded sample, sorted."""
    if size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def recall_against_exact(
    index: faiss.Index, vectors: np.ndarray, plan: IndexPlan, k: int = 10, sample: int = 1000,
    seed: int = 0,
) -> tuple[float, int, bool]:
    """(share of the exact top-``k`` the index finds, queries measured, whether they were held
    out) for a seeded sample of the indexed vectors held out of the quantizers' training (all
    vectors when every one trained them), each query excluding itself."""
    count = len(vectors)
    k = max(1, min(k, count - 1))
    held_out = np.setdiff1d(np.arange(count), training_sample(count, plan.train_size, seed))
    was_held_out = len(held_out) > 0
    if not was_held_out:
        held_out = np.arange(count)
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(held_out, min(sample, len(held_out)), replace=False))
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    found, _ = drop_self(*search(index, queries, k + 1), k, rows)
    exact = _exact_top(vectors, queries, k + 1)
    exact, _ = drop_self(exact[0], exact[1], k, rows)
    overlap = [len(set(a) & set(e)) / k for a, e in zip(found, exact, strict=True)]
    return float(np.mean(overlap)), len(rows), was_held_out


def _exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by brute force over blocks of ``vectors``, never a second full copy."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(vectors), 1 << 18):
        block = np.ascontiguousarray(vectors[start:start + (1 << 18)], dtype=np.float32)
        scores, ids = faiss.knn(queries, block, min(k, len(block)), faiss.METRIC_INNER_PRODUCT)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    return best_ids, best_scores


def _on_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """Exact search on a GPU when a GPU build of FAISS finds one (faiss-cpu has none)."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
    gpu_index.resources = resources  # the index must not outlive its GPU resources
    return gpu_index


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    chunk: int = 8192,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (ids, scores) for each query, searched ``chunk`` queries at a time.

    Memory is O(n * k), never an n x n matrix. Missing results (k > index size) have id -1.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, index.ntotal))
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        stop = min(len(queries), start + chunk)
        scores[start:stop], ids[start:stop] = index.search(queries[start:stop], k)
        if on_progress is not None:
            on_progress(stop - start)
    return ids, scores


def drop_self(
    ids: np.ndarray, scores: np.ndarray, k: int, query_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from results searched with one extra neighbour.

    Row i is query ``query_ids[i]`` (default: i). Where the query itself is not among its
    results (an exact tie, or an approximate index missing it), the last result is dropped.
    """
    n = ids.shape[0]
    own_ids = np.arange(n) if query_ids is None else np.asarray(query_ids)
    own = ids == own_ids[:, None]
    missing = ~own.any(axis=1)
    own[missing, -1] = True
    keep = ~own
    # Exactly one entry per row is removed.
    ids = ids[keep].reshape(n, -1)[:, :k]
    scores = scores[keep].reshape(n, -1)[:, :k]
    return ids, scores


def nearest_neighbours(
    queries: np.ndarray,
    gallery: np.ndarray | None,
    k: int,
    index_kind: str = "flat",
    chunk: int = 8192,
    on_progress: Callable[[int], None] | None = None,
    exclude_self: bool | None = None,
    query_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the ``k`` nearest gallery vectors per query.

    ``gallery=None`` searches the queries among themselves. ``exclude_self`` (default: when the
    gallery is the queries) drops gallery item i from query i's results: the same image.
    ``query_ids``: the gallery id of each query's own item when the queries are a subset.
    """
    if exclude_self is None:
        exclude_self = gallery is None
    index = build_index(queries if gallery is None else gallery, index_kind)
    if exclude_self:
        ids, scores = search(index, queries, k + 1, chunk, on_progress)
        return drop_self(ids, scores, k, query_ids)
    return search(index, queries, k, chunk, on_progress)


def write_index(path: str | Path, vectors: np.ndarray, index_kind: str = "flat") -> dict:
    """A FAISS index of the vectors, written atomically; returns its shape (``IndexPlan``) and,
    for an approximate kind, its recall@10 against exact search on held-out vectors."""
    plan = plan_index(len(vectors), vectors.shape[1], index_kind)
    index = build_index(vectors, index_kind, use_gpu=False, plan=plan)
    info = {**asdict(plan), "memory_bytes": plan.memory_bytes}
    if index_kind != "flat" and len(vectors) > 1:
        recall, sample, held_out = recall_against_exact(index, vectors, plan)
        info.update(recall_at_10_vs_exact=recall, recall_sample=sample,
                    recall_sample_held_out=held_out)
    atomic_write(path, lambda handle: handle.write(faiss.serialize_index(index).tobytes()))
    return info
