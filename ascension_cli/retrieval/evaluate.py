"""Retrieval evaluation: FAISS search, then metrics from the neighbours' labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ascension_cli.retrieval.index import nearest_neighbours
from ascension_cli.retrieval.metrics import RetrievalReport, relevant_counts, retrieval_metrics

_MISSING = np.iinfo(np.int64).min  # label of a missing neighbour (id -1): matches no query


@dataclass
class Evaluation:
    report: RetrievalReport
    index_kind: str
    neighbour_ids: np.ndarray  # (queries, depth) gallery ids, best first; -1 where none
    approximate_recall: float | None = None  # overlap of approximate and exact top-k, sampled


def _neighbour_labels(ids: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    labels = gallery_labels[np.clip(ids, 0, None)]
    labels[ids < 0] = _MISSING
    return labels


def evaluate(
    query_vectors: np.ndarray,
    query_labels: np.ndarray,
    gallery_vectors: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    index_kind: str = "flat",
    chunk: int = 8192,
    on_progress: Callable[[int], None] | None = None,
    approximate_sample: int = 1000,
    seed: int = 0,
    exclude_self: bool | None = None,
) -> Evaluation:
    """Recall@k, Precision@1, R-Precision, MAP@R of queries against a gallery.

    Without a gallery, the queries are searched among themselves with each query's own vector
    excluded; ``exclude_self`` does the same for a gallery whose item i is query i's image (a
    re-coloured query against the clean set). Neighbours are searched to depth
    max(max(ks), largest R), so R-Precision and MAP@R are exact. For ``hnsw``/``ivf`` the
    approximation's recall against exact search is measured on a sample of queries.
    """
    same_set = gallery_vectors is None if exclude_self is None else exclude_self
    if gallery_vectors is None:
        gallery_vectors, gallery_labels = query_vectors, query_labels
    relevant = relevant_counts(query_labels, gallery_labels, same_set)
    available = len(gallery_vectors) - (1 if same_set else 0)
    depth = max(1, min(available, max(max(ks), int(relevant.max(initial=0)))))
    ids, _ = nearest_neighbours(
        query_vectors, gallery_vectors, depth, index_kind, chunk, on_progress, same_set
    )
    report = retrieval_metrics(_neighbour_labels(ids, gallery_labels), query_labels, relevant, ks)
    evaluation = Evaluation(report, index_kind, ids)
    if index_kind != "flat" and len(query_vectors):
        rng = np.random.default_rng(seed)
        sample = rng.choice(len(query_vectors), min(approximate_sample, len(query_vectors)),
                            replace=False)
        k = min(max(ks), depth)
        exact_ids, _ = nearest_neighbours(query_vectors[sample], gallery_vectors, k, "flat",
                                          exclude_self=same_set, query_ids=sample)
        approx_ids = ids[sample, :k]
        overlap = [len(set(a) & set(e)) / k for a, e in zip(approx_ids, exact_ids, strict=True)]
        evaluation.approximate_recall = float(np.mean(overlap))
    return evaluation


def evaluate_recoloured(
    recoloured_vectors: np.ndarray,
    labels: np.ndarray,
    clean_vectors: np.ndarray,
    gallery_vectors: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    **options,
) -> Evaluation:
    """Recoloured queries searched where the clean queries were, so the two rows compare.

    Row i of ``recoloured_vectors`` and of ``clean_vectors`` is the same image (label
    ``labels[i]``). With a gallery, the recoloured queries go against that gallery, exactly as
    the clean ones did. Without one, the clean queries were searched among themselves, so the
    recoloured ones are searched among the clean queries with their own clean vector excluded.
    ``options`` are ``evaluate``'s (ks, index_kind, ...).
    """
    if gallery_vectors is None:
        return evaluate(recoloured_vectors, labels, clean_vectors, labels, exclude_self=True,
                        **options)
    return evaluate(recoloured_vectors, labels, gallery_vectors, gallery_labels,
                    exclude_self=False, **options)
