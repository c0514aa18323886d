"""Retrieval metrics from exact nearest neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LeaveOneOutRecall:
    recall_at_1: float
    queries: int
    excluded: int  # queries whose class has no other member, so no right answer exists


def leave_one_out_recall_at_1(
    features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, chunk: int = 2048
) -> LeaveOneOutRecall:
    """Recall@1 with every vector as a query against all the others (itself excluded).

    Cosine similarity on L2-normalised features, exact, searched in chunks so memory stays
    O(chunk * n). Queries whose class has no other member are left out and counted.
    """
    features = torch.as_tensor(features, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = features.shape[0]
    if n == 0:
        return LeaveOneOutRecall(float("nan"), 0, 0)
    counts = torch.bincount(labels - labels.min())[labels - labels.min()]
    answerable = counts > 1
    hits = 0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        similarity = features[start:stop] @ features.T
        rows = torch.arange(stop - start)
        similarity[rows, rows + start] = float("-inf")
        nearest = similarity.argmax(dim=1)
        correct = (labels[nearest] == labels[start:stop]) & answerable[start:stop]
        hits += int(correct.sum())
    queries = int(answerable.sum())
    recall = hits / queries if queries else float("nan")
    return LeaveOneOutRecall(recall, queries, n - queries)
