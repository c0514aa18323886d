"""FAISS index building and chunked k-nearest-neighbour search (inner product on unit vectors)."""

from __future__ import annotations

import os
from collections.abc import Callable

import faiss
import numpy as np

INDEX_KINDS = ("flat", "hnsw", "ivf")


def _use_all_cores() -> None:
    faiss.omp_set_num_threads(os.cpu_count() or 1)


def build_index(
    vectors: np.ndarray, index_kind: str = "flat", seed: int = 0, use_gpu: bool = True
) -> faiss.Index:
    """An inner-product index over ``vectors`` (float32, L2-normalised rows).

    ``flat`` is exact. ``hnsw`` (graph) and ``ivf`` (inverted lists, ~sqrt(n) of them) are
    approximate, for galleries past about a million vectors. ``use_gpu`` moves a flat index to
    the GPU when a GPU build of FAISS is installed (not for an index that will be written).
    """
    _use_all_cores()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if index_kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
        index.hnsw.efConstruction = 80
    elif index_kind == "ivf":
        lists = max(1, min(int(np.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)
        index.nprobe = max(1, min(lists, 16))
    else:
        raise ValueError(f"unknown index kind {index_kind!r}; choose one of {INDEX_KINDS}")
    if index_kind == "flat" and use_gpu:
        index = _on_gpu_if_available(index)
    index.add(vectors)
    return index


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
    _use_all_cores()
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
