"""Retrieval evaluation: FAISS search, then metrics from the neighbours' labels."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from ascension_cli.embedding.vectors import Vectors
from ascension_cli.errors import VectorsError
from ascension_cli.retrieval.index import MIN_IVFPQ, nearest_neighbours
from ascension_cli.retrieval.metrics import (
    QueryScores,
    RetrievalReport,
    query_scores,
    relevant_counts,
    report_of,
)

_MISSING = np.iinfo(np.int64).min  # label of a missing neighbour (id -1): matches no query


@dataclass
class Evaluation:
    report: RetrievalReport
    index_kind: str
    neighbour_ids: np.ndarray  # (queries, depth) gallery ids, best first; -1 where none
    scores: QueryScores  # each answerable query's figures (the report's are their means)
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
    query_ids: np.ndarray | None = None,
) -> Evaluation:
    """Recall@k, Precision@1, R-Precision, MAP@R of queries against a gallery.

    Without a gallery, the queries are searched among themselves with each query's own vector
    excluded; ``exclude_self`` does the same for a gallery whose item i is query i's image (a
    re-coloured query against the clean set). ``query_ids`` gives each query's own row in the
    gallery, or -1 where it has none (a manifest's rows that are both query and gallery item):
    those own rows are excluded. Neighbours are searched to depth
    max(max(ks), largest R), so R-Precision and MAP@R are exact. For ``hnsw``/``ivf`` the
    approximation's recall against exact search is measured on a sample of queries.
    """
    same_set = gallery_vectors is None if exclude_self is None else exclude_self
    if gallery_vectors is None:
        gallery_vectors, gallery_labels = query_vectors, query_labels
    if index_kind == "ivfpq" and len(gallery_vectors) < MIN_IVFPQ:
        raise VectorsError(f"{{index}} ivfpq needs a gallery of at least {MIN_IVFPQ:,} vectors "
                           f"to train its codebooks (this one has {len(gallery_vectors):,}); "
                           "use {index} flat, exact", options=("index",))
    own_ids = np.arange(len(query_vectors)) if same_set else query_ids
    owned = np.zeros(len(query_vectors), bool) if own_ids is None else np.asarray(own_ids) >= 0
    relevant = relevant_counts(query_labels, gallery_labels, False) - owned
    available = len(gallery_vectors) - (1 if owned.any() else 0)
    depth = max(1, min(available, max(max(ks), int(relevant.max(initial=0)))))
    exclude = bool(owned.any())
    ids, _ = nearest_neighbours(
        query_vectors, gallery_vectors, depth, index_kind, chunk, on_progress, exclude, own_ids
    )
    scores = query_scores(_neighbour_labels(ids, gallery_labels), query_labels, relevant, ks)
    evaluation = Evaluation(report_of(scores, ks), index_kind, ids, scores)
    if index_kind != "flat" and len(query_vectors):
        rng = np.random.default_rng(seed)
        sample = rng.choice(len(query_vectors), min(approximate_sample, len(query_vectors)),
                            replace=False)
        k = min(max(ks), depth)
        exact_ids, _ = nearest_neighbours(
            query_vectors[sample], gallery_vectors, k, "flat", exclude_self=exclude,
            query_ids=None if own_ids is None else np.asarray(own_ids)[sample])
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


@dataclass
class EvaluationRun:
    """``eval``'s whole measurement: clean queries, and each recolouring of them."""

    clean: Evaluation
    recoloured: dict[str, Evaluation]
    queries: Vectors  # labels indexed into the searched set's classes
    searched: Vectors  # the gallery, or the queries themselves
    gallery_was_queries: bool = False  # the gallery held the queries' images: searched as one


def check_evaluable(queries: Vectors, gallery: Vectors | None) -> None:
    """Metrics need labelled vectors of one dimension and a class the two sets share."""
    if not queries.labelled:
        raise VectorsError("the query vectors have no labels (a flat folder): metrics need "
                           "class folders")
    if gallery is None:
        return
    if not gallery.labelled:
        raise VectorsError("the gallery vectors have no labels: metrics need class folders")
    if gallery.vectors.shape[1] != queries.vectors.shape[1]:
        raise VectorsError(
            f"dimension mismatch: queries have {queries.vectors.shape[1]}, gallery "
            f"{gallery.vectors.shape[1]}"
        )
    if not set(gallery.class_names) & set(queries.class_names):
        raise VectorsError("queries and gallery share no class name: nothing can be relevant")


def labels_by_name(queries: Vectors, gallery_classes: list[str]) -> np.ndarray:
    """Query labels re-indexed into the gallery's classes (matched by folder name)."""
    position = {name: index for index, name in enumerate(gallery_classes)}
    # A class the gallery lacks gets a label no gallery item has: its queries are left out.
    mapping = np.array([position.get(name, -2) for name in queries.class_names], dtype=np.int64)
    return mapping[queries.labels]


def evaluate_vectors(
    queries: Vectors,
    gallery: Vectors | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    index_kind: str = "flat",
    recoloured: Mapping[str, Callable[[], np.ndarray]] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EvaluationRun:
    """Queries against a gallery (or among themselves), then each recolouring of the queries.

    A gallery holding the very images of the queries is searched as one set, each query's own
    vector excluded. ``recoloured`` maps a recolouring's name to a function returning the
    queries' vectors recoloured that way (same rows), searched where the clean ones were.
    """
    same = (gallery is not None and gallery.paths == queries.paths
            and gallery.image_root == queries.image_root)
    if same:
        gallery = None
    if gallery is None and has_roles(queries):
        if recoloured:
            raise VectorsError("{recolor} measures queries searched among themselves or "
                               "against {gallery}, not a manifest's query/gallery flags",
                               options=("recolor", "gallery"))
        return _evaluate_roles(queries, ks, index_kind, on_progress)
    check_evaluable(queries, gallery)
    if gallery is not None:
        queries = replace(queries, labels=labels_by_name(queries, gallery.class_names))
    gallery_vectors = None if gallery is None else gallery.vectors
    gallery_labels = None if gallery is None else gallery.labels
    clean = evaluate(queries.vectors, queries.labels, gallery_vectors, gallery_labels, ks=ks,
                     index_kind=index_kind, on_progress=on_progress)
    shifted = {
        name: evaluate_recoloured(embed(), queries.labels, queries.vectors, gallery_vectors,
                                  gallery_labels, ks=ks, index_kind=index_kind)
        for name, embed in (recoloured or {}).items()
    }
    return EvaluationRun(clean, shifted, queries, queries if gallery is None else gallery, same)


def has_roles(vectors: Vectors) -> bool:
    """Vectors from a manifest with is_query / is_gallery columns."""
    return vectors.is_query is not None or vectors.is_gallery is not None


def split_roles(vectors: Vectors) -> tuple[Vectors, Vectors, np.ndarray]:
    """(queries, gallery, each query's own row in the gallery or -1) of vectors whose rows a
    manifest flagged as queries, gallery items or both (a missing column means all)."""
    every = np.ones(len(vectors), dtype=bool)
    query = every if vectors.is_query is None else vectors.is_query
    gallery = every if vectors.is_gallery is None else vectors.is_gallery
    if not query.any() or not gallery.any():
        missing = "query" if not query.any() else "gallery"
        raise VectorsError(f"no image is flagged as a {missing} (is_{missing} column): nothing "
                           "to evaluate")
    gallery_row = np.full(len(vectors), -1, dtype=np.int64)
    gallery_row[gallery] = np.arange(int(gallery.sum()))

    def rows(mask: np.ndarray) -> Vectors:
        chosen = np.flatnonzero(mask)
        return replace(vectors, vectors=vectors.vectors[chosen], labels=vectors.labels[chosen],
                       paths=[vectors.paths[i] for i in chosen], is_query=None, is_gallery=None,
                       item_ids=None if vectors.item_ids is None
                       else [vectors.item_ids[i] for i in chosen])

    return rows(query), rows(gallery), gallery_row[query]


def _evaluate_roles(
    vectors: Vectors, ks: tuple[int, ...], index_kind: str,
    on_progress: Callable[[int], None] | None,
) -> EvaluationRun:
    """The standard query/gallery protocol of a manifest's flags: each query searched among the
    gallery items, itself excluded where it is one of them."""
    queries, gallery, own = split_roles(vectors)
    check_evaluable(queries, gallery)
    clean = evaluate(queries.vectors, queries.labels, gallery.vectors, gallery.labels, ks=ks,
                     index_kind=index_kind, on_progress=on_progress, exclude_self=False,
                     query_ids=own)
    return EvaluationRun(clean, {}, queries, gallery, False)
