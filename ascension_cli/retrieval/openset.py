"""Open-set measures: what a similarity threshold does to queries of items the gallery has
(known) and of items it lacks (unknown), from each query's top-1 similarity. Plain arrays in,
plain arrays out, like the metrics beside them.

A query is *accepted* when its top-1 similarity reaches the threshold (``score >= t``).
- FMR (false match rate): the share of unknown queries accepted.
- FNMR (false non-match rate): the share of known queries refused.
- Recall@1 of the accepted known queries: of the known queries let through, the share whose
  top-1 match is of the right class.
- AUC: the area under the ROC curve of known against unknown by top-1 similarity, the chance
  that a random known query scores above a random unknown one (ties count a half).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class OpenSetCurve:
    thresholds: np.ndarray  # ascending
    fmr: np.ndarray
    fnmr: np.ndarray
    recall_at_1_accepted: np.ndarray  # nan where no known query is accepted
    auc: float


def _accepted_share(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, the share of ``scores`` that reach it."""
    if len(scores) == 0:
        return np.full(len(thresholds), np.nan)
    ordered = np.sort(scores)
    below = np.searchsorted(ordered, thresholds, side="left")  # scores < t
    return (len(scores) - below) / len(scores)


def roc_auc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(known > unknown) + half P(known == unknown), by ranks (Mann-Whitney)."""
    known, unknown = np.asarray(known, float), np.asarray(unknown, float)
    if len(known) == 0 or len(unknown) == 0:
        return float("nan")
    both = np.concatenate([known, unknown])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # Ties share their mean rank.
    values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    known_ranks = ranks[: len(known)].sum()
    return float((known_ranks - len(known) * (len(known) + 1) / 2) / (len(known) * len(unknown)))


def _rates(known: np.ndarray, correct: np.ndarray, unknown: np.ndarray,
           thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FMR, FNMR and the accepted known queries' Recall@1 at each threshold."""
    fmr = _accepted_share(unknown, thresholds)
    fnmr = 1 - _accepted_share(known, thresholds)
    # Accepted and correct, over accepted, from the scores of the correct ones alone.
    accepted = _accepted_share(known, thresholds) * len(known)
    right = _accepted_share(known[correct], thresholds) * correct.sum() if correct.any() else (
        np.zeros(len(thresholds)))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(accepted > 0, right / np.maximum(accepted, 1), np.nan)
    return fmr, fnmr, recall


def open_set_curve(known_scores, known_correct, unknown_scores,
                   thresholds=None) -> OpenSetCurve:
    """FMR, FNMR and the accepted known queries' Recall@1 at each threshold (default: every
    distinct score, and one above them all), and the AUC."""
    known = np.asarray(known_scores, float)
    unknown = np.asarray(unknown_scores, float)
    if thresholds is None:
        every = np.unique(np.concatenate([known, unknown]))
        thresholds = np.append(every, np.nextafter(every[-1], np.inf) if len(every) else 1.0)
    thresholds = np.sort(np.asarray(thresholds, float))
    fmr, fnmr, recall = _rates(known, np.asarray(known_correct, bool), unknown, thresholds)
    return OpenSetCurve(thresholds, fmr, fnmr, recall, roc_auc(known, unknown))


def rates_at(known_scores, known_correct, unknown_scores,
             threshold: float) -> tuple[float, float, float]:
    """(FMR, FNMR, Recall@1 of the accepted known) at one threshold: the curve's figures
    there, without the curve's AUC."""
    fmr, fnmr, recall = _rates(np.asarray(known_scores, float), np.asarray(known_correct, bool),
                               np.asarray(unknown_scores, float), np.array([float(threshold)]))
    return float(fmr[0]), float(fnmr[0]), float(recall[0])


# How far above the highest refused unknown score a threshold sits: a photo embedded again
# differs in the last float32 bits, which must not flip its verdict.
THRESHOLD_MARGIN = 1e-4


def _threshold_accepting(unknown_scores, allowed: int) -> float:
    """A threshold that accepts the ``allowed`` highest unknown scores and refuses the rest:
    just above the highest it refuses, by ``THRESHOLD_MARGIN`` or half the gap to the next one
    up."""
    unknown = np.sort(np.asarray(unknown_scores, float))
    if len(unknown) == 0:
        raise ValueError("no unknown queries to calibrate on")
    if allowed >= len(unknown):
        return -1.0  # every unknown may pass: refuse nothing (cosine similarity >= -1)
    refused = unknown[len(unknown) - allowed - 1]
    above = unknown[len(unknown) - allowed] if allowed else refused + 2 * THRESHOLD_MARGIN
    margin = min(THRESHOLD_MARGIN, (above - refused) / 2)
    if margin <= 0:  # tied with an accepted one: refusing it refuses them all
        margin = THRESHOLD_MARGIN
    return float(min(1.0, refused + margin))


def threshold_for_fmr(unknown_scores, target_fmr: float) -> float:
    """The lowest threshold at which at most ``target_fmr`` of these unknown queries are
    accepted (it refuses as few known queries as it can): what a measurement reports."""
    count = len(np.asarray(unknown_scores))
    return _threshold_accepting(unknown_scores, int(np.floor(target_fmr * count + 1e-9)))


def calibrated_threshold(unknown_scores, target_fmr: float) -> float:
    """A threshold for photos not seen yet: new unknowns pass at ``target_fmr`` on average.

    Refusing the k-th highest of n unknown scores and all below, a new unknown (from the same
    distribution) passes with probability k / (n + 1), so k = round(target (n + 1)), at least
    1. The lowest threshold on the calibration photos themselves (``threshold_for_fmr``) sits at
    the (floor(target n) + 1)-th: on new photos it accepts more than asked, up to twice the
    target when n is small. These photos' own FMR stays within the target either way.
    """
    count = len(np.asarray(unknown_scores))
    refused_rank = max(1, round(target_fmr * (count + 1)))
    return _threshold_accepting(unknown_scores, min(refused_rank - 1,
                                                    int(np.floor(target_fmr * count + 1e-9))))


@dataclass(frozen=True)
class OpenSetReport:
    """An open-set evaluation: held-out classes, the curve, and the figures at a target FMR."""

    unknown_classes: list[str]
    known_queries: int
    unknown_queries: int
    curve: OpenSetCurve
    target_fmr: float
    threshold: float  # the lowest threshold with FMR <= target on these queries
    fmr: float  # at that threshold
    fnmr: float
    recall_at_1_accepted: float
    # Each query's top-1 similarity (and, for the known, whether its class is right): what the
    # report draws.
    known_scores: np.ndarray | None = field(default=None, repr=False, compare=False)
    known_correct: np.ndarray | None = field(default=None, repr=False, compare=False)
    unknown_scores: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"unknown_classes": self.unknown_classes, "known_queries": self.known_queries,
                "unknown_queries": self.unknown_queries, "auc": self.curve.auc,
                "target_fmr": self.target_fmr, "threshold": self.threshold, "fmr": self.fmr,
                "fnmr": self.fnmr, "recall_at_1_accepted": self.recall_at_1_accepted}


def held_out_classes(labels: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """A seeded ``share`` of the classes present in ``labels`` (at least one, and at least one
    left known)."""
    present = np.unique(labels[labels >= 0])
    if len(present) < 2:
        raise ValueError("an open-set evaluation needs at least two classes")
    count = min(len(present) - 1, max(1, round(share * len(present))))
    return np.sort(np.random.default_rng(seed).choice(present, count, replace=False))


def top1(query_vectors: np.ndarray, gallery_vectors: np.ndarray | None,
         exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, similarities) of each query's best gallery match."""
    from ascension_cli.retrieval.index import nearest_neighbours

    ids, similarity = nearest_neighbours(query_vectors, gallery_vectors, 1,
                                         exclude_self=exclude_self)
    return ids[:, 0], similarity[:, 0]


def evaluate_open_set(query_vectors: np.ndarray, query_labels: np.ndarray,
                      gallery_vectors: np.ndarray | None, gallery_labels: np.ndarray | None,
                      unknown: np.ndarray, class_names: list[str],
                      target_fmr: float = 0.01, lacking: list[str] = ()) -> OpenSetReport:
    """Queries of the ``unknown`` classes become unknowns: the gallery (the queries themselves,
    each its own vector excluded, when None) loses those classes' photos, and each query's top-1
    similarity tells known from unknown. A query of a class the searched gallery has no photo
    of is unknown too, whatever its label (``lacking``: the names of such classes, for the
    report): a known query is one that can be right."""
    same = gallery_vectors is None
    gallery_vectors = query_vectors if same else gallery_vectors
    gallery_labels = query_labels if same else gallery_labels
    keep = ~np.isin(gallery_labels, unknown)
    searched, searched_labels = gallery_vectors[keep], gallery_labels[keep]
    is_unknown = np.isin(query_labels, unknown) | ~np.isin(query_labels, searched_labels)
    ids, similarity = top1(query_vectors, searched, False)
    if same:  # a known query must not find itself: search the known ones among themselves
        known_rows = np.flatnonzero(~is_unknown)
        own_ids, own_similarity = top1(query_vectors[known_rows], None, True)
        ids[known_rows] = own_ids
        similarity[known_rows] = own_similarity
    correct = searched_labels[np.clip(ids, 0, None)] == query_labels
    correct &= ids >= 0
    curve = open_set_curve(similarity[~is_unknown], correct[~is_unknown], similarity[is_unknown])
    threshold = threshold_for_fmr(similarity[is_unknown], target_fmr)
    at = rates_at(similarity[~is_unknown], correct[~is_unknown], similarity[is_unknown],
                  threshold)
    return OpenSetReport(
        [class_names[c] for c in unknown] + list(lacking), int((~is_unknown).sum()),
        int(is_unknown.sum()),
        curve, target_fmr, threshold, *at, similarity[~is_unknown], correct[~is_unknown],
        similarity[is_unknown])
