"""What to clean in labelled photos, from each photo's nearest neighbours among the others (ids
and similarities, most similar first, its own id left out, -1 where none): photos filed under
one class whose neighbours all agree on another (suspected label errors), near-duplicate photos
filed under two classes, and items of two classes a search may take for each other. Plain
arrays in, plain lists out; each is tested against a loop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AGREEING = 5  # a suspected label error: this many nearest neighbours, all of one other class
NEAR_DUPLICATE_SIMILARITY = 0.98  # two photos this similar are (nearly) the same picture
NEIGHBOURS = 32  # how many nearest photos of each photo a check looks through


@dataclass(frozen=True)
class SuspectedLabel:
    row: int
    label: int  # the class it is filed under
    suggested: int  # the class its nearest neighbours agree on
    margin: float  # their mean similarity over that of its nearest photo of its own class
    own_rank: int  # 1-based rank of that photo; depth + 1 when none was searched
    neighbours: tuple[int, ...]  # the agreeing neighbours


@dataclass(frozen=True)
class PhotoPair:
    first: int
    second: int
    similarity: float


@dataclass(frozen=True)
class ItemPair:
    """Two items of different classes, and their most similar photos."""

    first: str
    second: str
    similarity: float
    first_row: int
    second_row: int


def _neighbour_labels(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.where(ids >= 0, labels[np.clip(ids, 0, None)], -1)


def _close_across_classes(ids: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                          threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the neighbours at least ``threshold`` similar whose photo and the
    neighbour are both labelled, with different classes."""
    labels = np.asarray(labels)
    found = _neighbour_labels(ids, labels)
    return np.nonzero((scores >= threshold) & (ids >= 0) & (found != labels[:, None])
                      & (labels[:, None] >= 0) & (found >= 0))


def suspected_label_errors(ids: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                           agreeing: int = AGREEING) -> list[SuspectedLabel]:
    """Photos whose first ``agreeing`` neighbours are all of one other class, most suspect
    first: by how much more similar those neighbours are than the photo's nearest of its own
    class (or than the last one searched, when none of its own class was)."""
    labels = np.asarray(labels)
    if ids.shape[1] < agreeing:
        return []
    found = _neighbour_labels(ids, labels)
    first = found[:, :agreeing]
    suspect = ((first == first[:, :1]).all(axis=1) & (first[:, 0] >= 0)
               & (first[:, 0] != labels) & (labels >= 0))
    own = found == labels[:, None]
    has_own = own.any(axis=1)
    own_column = np.where(has_own, own.argmax(axis=1), ids.shape[1] - 1)
    own_similarity = scores[np.arange(len(ids)), own_column]
    margin = scores[:, :agreeing].mean(axis=1) - own_similarity
    rows = sorted(np.flatnonzero(suspect).tolist(), key=lambda row: (-margin[row], row))
    return [SuspectedLabel(row, int(labels[row]), int(first[row, 0]), float(margin[row]),
                           int(own_column[row] + 1) if has_own[row] else ids.shape[1] + 1,
                           tuple(int(i) for i in ids[row, :agreeing])) for row in rows]


def cross_class_duplicates(ids: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                           threshold: float = NEAR_DUPLICATE_SIMILARITY) -> list[PhotoPair]:
    """Pairs of photos of different classes at least ``threshold`` similar, each pair once
    (lower row first), most similar first."""
    rows, columns = _close_across_classes(ids, scores, labels, threshold)
    pairs: dict[tuple[int, int], float] = {}
    for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
        key = (min(row, int(ids[row, column])), max(row, int(ids[row, column])))
        pairs[key] = max(pairs.get(key, -2.0), float(scores[row, column]))
    ordered = sorted(pairs.items(), key=lambda pair: (-pair[1], pair[0]))
    return [PhotoPair(first, second, similarity) for (first, second), similarity in ordered]


def confusable_items(ids: np.ndarray, scores: np.ndarray, labels: np.ndarray, items: list[str],
                     threshold: float) -> list[ItemPair]:
    """Pairs of items of different classes whose most similar photos are at least ``threshold``
    similar, each pair once (its names in sorted order), most similar first."""
    rows, columns = _close_across_classes(ids, scores, labels, threshold)
    best: dict[tuple[str, str], ItemPair] = {}
    for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
        other = int(ids[row, column])
        if items[row] == items[other]:
            continue
        (first, first_row), (second, second_row) = sorted([(items[row], row),
                                                           (items[other], other)])
        similarity = float(scores[row, column])
        held = best.get((first, second))
        if held is None or similarity > held.similarity:
            best[(first, second)] = ItemPair(first, second, similarity, first_row, second_row)
    return sorted(best.values(), key=lambda pair: (-pair.similarity, pair.first, pair.second))
