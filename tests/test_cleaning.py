"""Data-cleaning lists against plain loops over the same neighbours, on random data."""

from __future__ import annotations

import numpy as np
import pytest

from ascension_cli.retrieval.cleaning import (
    confusable_items,
    cross_class_duplicates,
    suspected_label_errors,
)
from ascension_cli.retrieval.index import nearest_neighbours


def neighbours(seed: int, n: int = 120, classes: int = 4, depth: int = 12):
    """Clustered vectors with some labels flipped, some exact copies, and their neighbours."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 16))
    labels = rng.integers(0, classes, n)
    vectors = centres[labels] + rng.normal(scale=0.6, size=(n, 16))
    vectors[5] = vectors[6]  # an exact copy (labels may differ)
    flipped = rng.choice(n, 8, replace=False)
    labels[flipped] = (labels[flipped] + 1) % classes
    labels[0] = -1  # an unlabelled photo takes part in nothing
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    ids, scores = nearest_neighbours(vectors, None, depth)
    return ids, scores, labels, flipped


@pytest.mark.parametrize("seed", range(4))
def test_suspected_label_errors_match_a_loop(seed):
    ids, scores, labels, flipped = neighbours(seed)
    expected = []
    for row in range(len(ids)):
        first = [labels[i] for i in ids[row, :5]]
        if labels[row] < 0 or len(set(first)) != 1 or first[0] == labels[row] or first[0] < 0:
            continue
        own = [column for column in range(ids.shape[1]) if labels[ids[row, column]] == labels[row]]
        own_similarity = scores[row, own[0]] if own else scores[row, -1]
        margin = float(np.mean(scores[row, :5]) - own_similarity)
        rank = own[0] + 1 if own else ids.shape[1] + 1
        expected.append((row, first[0], margin, rank))
    expected.sort(key=lambda entry: (-entry[2], entry[0]))
    found = suspected_label_errors(ids, scores, labels)
    assert [(e.row, e.suggested, e.own_rank) for e in found] == [
        (row, suggested, rank) for row, suggested, _, rank in expected]
    assert np.allclose([e.margin for e in found], [entry[2] for entry in expected], atol=1e-6)
    assert all(e.label == labels[e.row] and e.label != e.suggested for e in found)
    # The flipped photos are what it finds first, on data this clean.
    if found:
        top = {e.row for e in found[: len(flipped)]}
        assert len(top & set(flipped.tolist())) >= len(top) // 2


@pytest.mark.parametrize("seed", range(4))
def test_cross_class_duplicates_match_a_loop(seed):
    ids, scores, labels, _ = neighbours(seed)
    threshold = float(np.quantile(scores[:, 0], 0.8))
    expected = {}
    for row in range(len(ids)):
        for other, similarity in zip(ids[row], scores[row], strict=True):
            if (similarity >= threshold and labels[row] >= 0 and labels[other] >= 0
                    and labels[row] != labels[other]):
                key = (min(row, other), max(row, other))
                expected[key] = max(expected.get(key, -2), float(similarity))
    found = cross_class_duplicates(ids, scores, labels, threshold)
    assert {(p.first, p.second): p.similarity for p in found} == pytest.approx(expected)
    assert [p.similarity for p in found] == sorted((p.similarity for p in found), reverse=True)
    assert all(p.first < p.second for p in found)


@pytest.mark.parametrize("seed", range(4))
def test_confusable_items_match_a_loop(seed):
    ids, scores, labels, _ = neighbours(seed)
    items = [f"sku{row % 30}-{labels[row]}" for row in range(len(ids))]  # several photos each
    threshold = float(np.quantile(scores[:, 0], 0.5))
    expected = {}
    for row in range(len(ids)):
        for other, similarity in zip(ids[row], scores[row], strict=True):
            if (similarity >= threshold and labels[row] >= 0 and labels[other] >= 0
                    and labels[row] != labels[other] and items[row] != items[other]):
                key = tuple(sorted((items[row], items[other])))
                expected[key] = max(expected.get(key, -2), float(similarity))
    found = confusable_items(ids, scores, labels, items, threshold)
    assert {(p.first, p.second): p.similarity for p in found} == pytest.approx(expected)
    for pair in found:  # the photos named are the pair's most similar ones
        assert items[pair.first_row] == pair.first and items[pair.second_row] == pair.second
        assert labels[pair.first_row] != labels[pair.second_row]


def test_an_exact_copy_under_another_class_is_a_near_duplicate():
    ids, scores, labels, _ = neighbours(0)
    labels[5], labels[6] = 1, 2
    pairs = cross_class_duplicates(ids, scores, labels)
    assert (5, 6) in {(p.first, p.second) for p in pairs}
    assert pairs[0].similarity > 0.999
