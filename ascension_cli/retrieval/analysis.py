"""Where retrieval fails, from an evaluation's neighbour ids: which classes are taken for which,
and which queries find their class last. Plain numpy, so each figure is tested against a loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Confusion:
    """Queries of ``query_class`` whose first neighbour is of ``neighbour_class``."""

    query_class: int
    neighbour_class: int
    count: int
    examples: list[tuple[int, int]] = field(default_factory=list)  # (query row, neighbour id)


def confused_pairs(
    neighbour_ids: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
    most: int = 8, examples: int = 2,
) -> list[Confusion]:
    """The most frequent (query class, wrong top-1 class) pairs, most first, with the first
    ``examples`` queries of each. Queries without a neighbour, or whose class the gallery lacks,
    are left out."""
    first = neighbour_ids[:, 0]
    found = first >= 0
    neighbour = np.where(found, gallery_labels[np.clip(first, 0, None)], -1)
    wrong = found & (neighbour != query_labels) & (query_labels >= 0)
    rows = np.flatnonzero(wrong)
    pairs: dict[tuple[int, int], Confusion] = {}
    for row in rows:
        key = (int(query_labels[row]), int(neighbour[row]))
        pair = pairs.setdefault(key, Confusion(*key, 0))
        pair.count += 1
        if len(pair.examples) < examples:
            pair.examples.append((int(row), int(first[row])))
    ranked = sorted(pairs.values(), key=lambda p: (-p.count, p.query_class, p.neighbour_class))
    return ranked[:most]


def first_correct_rank(
    neighbour_ids: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray
) -> np.ndarray:
    """1-based rank of each query's first neighbour of its own class; depth + 1 where none of
    the searched neighbours is."""
    labels = np.where(neighbour_ids >= 0, gallery_labels[np.clip(neighbour_ids, 0, None)], -1)
    correct = labels == query_labels[:, None]
    depth = neighbour_ids.shape[1]
    return np.where(correct.any(axis=1), correct.argmax(axis=1) + 1, depth + 1)


def worst_queries(
    neighbour_ids: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
    count: int = 12,
) -> list[tuple[int, int]]:
    """(query row, first-correct rank) of the ``count`` queries that find their class last
    (ties: the lower row first); only queries that missed at rank 1."""
    ranks = first_correct_rank(neighbour_ids, query_labels, gallery_labels)
    missed = (ranks > 1) & (query_labels >= 0)  # a class the gallery lacks cannot be found
    order = sorted(np.flatnonzero(missed).tolist(), key=lambda row: (-ranks[row], row))
    return [(row, int(ranks[row])) for row in order[:count]]
