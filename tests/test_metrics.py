import numpy as np
import pytest

from ascension_cli.retrieval.metrics import leave_one_out_recall_at_1


def brute_force(features: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    hits = queries = 0
    for i in range(len(features)):
        if (labels == labels[i]).sum() < 2:
            continue
        queries += 1
        hits += labels[int(np.argmax(similarity[i]))] == labels[i]
    return hits / queries, queries


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("clustered", [False, True])
def test_equals_brute_force(chunk, clustered):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=200)
    features = rng.normal(size=(200, 16))
    if clustered:
        features += 3 * rng.normal(size=(12, 16))[labels]
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    features = features.astype(np.float32)
    result = leave_one_out_recall_at_1(features, labels, chunk=chunk)
    expected, queries = brute_force(features, labels)
    assert result.recall_at_1 == pytest.approx(expected, abs=1e-9)
    assert result.queries == queries


def test_singleton_classes_are_excluded_and_counted():
    features = np.eye(4, dtype=np.float32)
    labels = np.array([0, 0, 1, 2])
    result = leave_one_out_recall_at_1(features, labels)
    assert result.excluded == 2
    assert result.queries == 2
