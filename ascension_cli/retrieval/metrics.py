"""Retrieval metrics computed from ranked neighbour labels, apart from the search."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RetrievalReport:
    """Retrieval metrics over the queries that have at least one relevant gallery item."""

    recall_at_k: dict[int, float]
    precision_at_1: float
    r_precision: float
    map_at_r: float
    per_class_recall_at_1: dict[int, float]
    queries: int
    excluded_queries: int

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        def name(label: int) -> str:
            if class_names is not None and 0 <= label < len(class_names):
                return class_names[label]
            return str(label)

        return {
            "queries": self.queries,
            "excluded_queries": self.excluded_queries,
            "recall_at_k": {str(k): v for k, v in sorted(self.recall_at_k.items())},
            "precision_at_1": self.precision_at_1,
            "r_precision": self.r_precision,
            "map_at_r": self.map_at_r,
            "per_class_recall_at_1": {
                name(label): value for label, value in sorted(self.per_class_recall_at_1.items())
            },
        }


def relevant_counts(
    query_labels: np.ndarray, gallery_labels: np.ndarray, same_set: bool
) -> np.ndarray:
    """R for each query: gallery items of its class (itself excluded when the sets are one)."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    lookup = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    r = np.array([lookup.get(int(label), 0) for label in query_labels], dtype=np.int64)
    return r - 1 if same_set else r


@dataclass
class QueryScores:
    """Each answerable query's own figures (the report's are their means), for paired
    comparisons of two models on the same queries."""

    labels: np.ndarray  # (n,) the answerable queries' labels
    recall_at_k: dict[int, np.ndarray]  # k -> (n,) bool: a relevant item among the first k
    r_precision: np.ndarray  # (n,)
    map_at_r: np.ndarray  # (n,)
    excluded: int  # queries with no relevant gallery item, left out


def query_scores(
    neighbour_labels: np.ndarray,
    query_labels: np.ndarray,
    relevant: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
) -> QueryScores:
    """Recall@k (for ``ks`` and 1), R-Precision and MAP@R of each query from ranked neighbour
    labels.

    Args:
        neighbour_labels: (n, K) labels of each query's gallery neighbours, best first; K must
            be at least max(ks) and each query's R (else R-Precision/MAP@R are computed at K).
        query_labels: (n,) labels of the queries.
        relevant: (n,) R, the number of gallery items sharing each query's label.

    Definitions follow Musgrave et al., "A Metric Learning Reality Check" (2020): R-Precision is
    the share of relevant items among the first R results; MAP@R averages precision at each rank
    i <= R where result i is relevant, divided by R. Queries with R = 0 are left out and counted.
    """
    query_labels = np.asarray(query_labels)
    answerable = np.asarray(relevant) > 0
    hits = np.asarray(neighbour_labels)[answerable] == query_labels[answerable, None]
    r = np.minimum(np.asarray(relevant)[answerable], hits.shape[1])
    ranks = np.arange(1, hits.shape[1] + 1)
    within_r = ranks[None, :] <= r[:, None]
    precision_at_rank = np.cumsum(hits, axis=1) / ranks[None, :]
    return QueryScores(
        labels=query_labels[answerable],
        recall_at_k={k: hits[:, :k].any(axis=1) for k in (*ks, 1)},
        r_precision=(hits & within_r).sum(axis=1) / np.maximum(r, 1),
        map_at_r=(precision_at_rank * (hits & within_r)).sum(axis=1) / np.maximum(r, 1),
        excluded=int((~answerable).sum()),
    )


def retrieval_metrics(
    neighbour_labels: np.ndarray,
    query_labels: np.ndarray,
    relevant: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
) -> RetrievalReport:
    """Recall@k, Precision@1, R-Precision and MAP@R over the answerable queries."""
    return report_of(query_scores(neighbour_labels, query_labels, relevant, ks), ks)


def report_of(scores: QueryScores, ks: tuple[int, ...]) -> RetrievalReport:
    """The means of ``query_scores`` (computed for ``ks``), and Recall@1 of each class."""
    if len(scores.labels) == 0:
        nan = float("nan")
        return RetrievalReport({k: nan for k in ks}, nan, nan, nan, {}, 0, scores.excluded)
    first = scores.recall_at_k[1]
    per_class = {
        int(label): float(first[scores.labels == label].mean())
        for label in np.unique(scores.labels)
    }
    return RetrievalReport(
        recall_at_k={k: float(scores.recall_at_k[k].mean()) for k in ks},
        precision_at_1=float(first.mean()),
        r_precision=float(scores.r_precision.mean()),
        map_at_r=float(scores.map_at_r.mean()),
        per_class_recall_at_1=per_class,
        queries=len(scores.labels),
        excluded_queries=scores.excluded,
    )
