"""Retrieval metrics against brute-force numpy and pytorch-metric-learning."""

import numpy as np
import pytest

from ascension_cli.retrieval.evaluate import evaluate
from ascension_cli.retrieval.index import nearest_neighbours
from ascension_cli.retrieval.metrics import relevant_counts, retrieval_metrics


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, classes: int, dim: int, clustered: bool, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    vectors = rng.normal(size=(n, dim))
    if clustered:
        vectors += 2.5 * rng.normal(size=(classes, dim))[labels]
    return unit(vectors), labels


def brute_force_per_query(queries, query_labels, gallery, gallery_labels, same_set, ks):
    """Each answerable query's metrics from a full similarity matrix, one Python loop each."""
    similarity = queries.astype(np.float64) @ gallery.astype(np.float64).T
    if same_set:
        np.fill_diagonal(similarity, -np.inf)
    recall = {k: [] for k in ks}
    r_precision, map_at_r, first = [], [], []
    for i in range(len(queries)):
        order = np.argsort(-similarity[i], kind="stable")
        if same_set:
            order = order[order != i]
        relevant = int((gallery_labels == query_labels[i]).sum()) - (1 if same_set else 0)
        if relevant == 0:
            continue
        hits = gallery_labels[order] == query_labels[i]
        for k in ks:
            recall[k].append(hits[:k].any())
        first.append(hits[0])
        r_precision.append(hits[:relevant].sum() / relevant)
        precisions = [hits[: j + 1].sum() / (j + 1) for j in range(relevant) if hits[j]]
        map_at_r.append(sum(precisions) / relevant)
    return recall, first, r_precision, map_at_r


def brute_force(queries, query_labels, gallery, gallery_labels, same_set, ks):
    """Every metric: the means of ``brute_force_per_query``."""
    recall, first, r_precision, map_at_r = brute_force_per_query(
        queries, query_labels, gallery, gallery_labels, same_set, ks)
    return (
        {k: float(np.mean(v)) for k, v in recall.items()},
        float(np.mean(first)), float(np.mean(r_precision)), float(np.mean(map_at_r)),
        len(first),
    )


def test_each_querys_scores_equal_brute_force():
    """The per-query figures a paired comparison of two models reads (bench_quality)."""
    queries, query_labels = make_data(200, 14, 10, True, seed=3)
    gallery, gallery_labels = make_data(300, 12, 10, True, seed=4)
    scores = evaluate(queries, query_labels, gallery, gallery_labels, ks=(1, 5)).scores
    recall, _, r_precision, map_at_r = brute_force_per_query(
        queries, query_labels, gallery, gallery_labels, False, (1, 5))
    assert scores.excluded == len(queries) - len(map_at_r) > 0  # classes the gallery lacks
    for k in (1, 5):
        assert scores.recall_at_k[k].tolist() == [bool(hit) for hit in recall[k]]
    assert np.allclose(scores.r_precision, r_precision)
    assert np.allclose(scores.map_at_r, map_at_r)


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("same_set", [True, False])
def test_metrics_equal_brute_force(clustered, same_set):
    queries, query_labels = make_data(300, 15, 12, clustered, seed=1)
    if same_set:
        gallery, gallery_labels = None, None
        expected = brute_force(queries, query_labels, queries, query_labels, True, (1, 5, 10))
    else:
        gallery, gallery_labels = make_data(500, 18, 12, clustered, seed=2)
        expected = brute_force(queries, query_labels, gallery, gallery_labels, False, (1, 5, 10))
    report = evaluate(queries, query_labels, gallery, gallery_labels, ks=(1, 5, 10)).report
    recall, precision_at_1, r_precision, map_at_r, answered = expected
    for k in (1, 5, 10):
        assert report.recall_at_k[k] == pytest.approx(recall[k], abs=1e-9)
    assert report.precision_at_1 == pytest.approx(precision_at_1, abs=1e-9)
    assert report.r_precision == pytest.approx(r_precision, abs=1e-9)
    assert report.map_at_r == pytest.approx(map_at_r, abs=1e-9)
    assert report.queries == answered


@pytest.mark.parametrize("clustered", [False, True])
def test_metrics_equal_pytorch_metric_learning(clustered):
    accuracy = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    vectors, labels = make_data(400, 10, 16, clustered, seed=3)
    calculator = accuracy.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        device=__import__("torch").device("cpu"),
    )
    import torch

    theirs = calculator.get_accuracy(
        torch.from_numpy(vectors), torch.from_numpy(labels),
        torch.from_numpy(vectors), torch.from_numpy(labels), ref_includes_query=True,
    )
    report = evaluate(vectors, labels, ks=(1,)).report
    assert report.precision_at_1 == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert report.r_precision == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert report.map_at_r == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_own_vector_is_excluded_in_one_set_mode():
    vectors = unit(np.eye(4) + 0.01)
    labels = np.array([0, 1, 0, 1])
    ids, _ = nearest_neighbours(vectors, None, 3)
    for i, row in enumerate(ids):
        assert i not in row
    # Every vector is nearest to itself: without exclusion recall@1 would be 1.
    assert evaluate(vectors, labels, ks=(1,)).report.recall_at_k[1] < 1


def test_queries_without_relevant_items_are_left_out_and_counted():
    vectors, _ = make_data(6, 1, 4, False, seed=4)
    labels = np.array([0, 0, 1, 2, 3, 3])
    report = evaluate(vectors, labels, ks=(1,)).report
    assert report.queries == 4 and report.excluded_queries == 2
    assert set(report.per_class_recall_at_1) == {0, 3}


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_search_equals_unchunked(chunk):
    queries, labels = make_data(120, 6, 8, True, seed=5)
    whole_ids, whole_scores = nearest_neighbours(queries, None, 9, chunk=10_000)
    ids, scores = nearest_neighbours(queries, None, 9, chunk=chunk)
    assert np.array_equal(ids, whole_ids) and np.allclose(scores, whole_scores)
    assert evaluate(queries, labels, chunk=chunk).report == evaluate(queries, labels).report


def test_per_class_recall_and_relevant_counts():
    labels = np.array([0, 0, 1, 1, 1])
    assert relevant_counts(labels, labels, True).tolist() == [1, 1, 2, 2, 2]
    assert relevant_counts(np.array([0, 2]), labels, False).tolist() == [2, 0]
    neighbour_labels = np.array([[0], [1], [1], [0], [1]])
    report = retrieval_metrics(neighbour_labels, labels, np.array([1, 1, 1, 1, 1]), ks=(1,))
    assert report.per_class_recall_at_1 == {0: 0.5, 1: pytest.approx(2 / 3)}


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_report_their_recall_against_exact(kind):
    queries, labels = make_data(2000, 20, 16, True, seed=6)
    evaluation = evaluate(queries, labels, ks=(1, 5), index_kind=kind, approximate_sample=200)
    exact = evaluate(queries, labels, ks=(1, 5)).report
    assert 0.5 < evaluation.approximate_recall <= 1.0
    assert abs(evaluation.report.recall_at_k[1] - exact.recall_at_k[1]) < 0.05
