"""Supervised Contrastive loss (Khosla et al. 2020, the L_out form) as a pure function."""

from __future__ import annotations

import torch


def supcon_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """SupCon L_out over every embedding in the batch.

    Args:
        embeddings: (N, D) L2-normalised vectors, every view of every image in one row each;
            or (N, V, D), which is flattened to (N*V, D).
        labels: (N,) class of each row, or of each image when ``embeddings`` is (N, V, D).
        temperature: the softmax temperature tau.

    For anchor i with positives P(i) (same label, not i itself) and all others A(i):
    ``l_i = -1/|P(i)| * sum_{p in P(i)} log(exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau))``.
    The loss is the mean over anchors that have at least one positive; with none it is 0, still
    attached to the graph. Computed in fp32 whatever the input dtype, so autocast cannot make the
    log-sum-exp overflow. Since the mean over positives of ``log(exp(a_ip) / sum_a exp(a_ia))``
    is ``mean_p a_ip - logsumexp_a a_ia``, only the denominators need the N x N similarity matrix.
    """
    if embeddings.dim() == 3:
        views = embeddings.shape[1]
        embeddings = embeddings.reshape(-1, embeddings.shape[-1])
        labels = labels.repeat_interleave(views)
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels"
        )
    features = embeddings.float()
    labels = labels.to(features.device)
    n = features.shape[0]
    if n < 2:
        return features.sum() * 0.0

    # Denominators: log-sum-exp over every other row. logsumexp subtracts each row's maximum
    # before exponentiating, so exp() cannot overflow however small tau is.
    logits = features @ features.T / temperature
    logits.diagonal().fill_(float("-inf"))  # an anchor is not its own "other"
    log_denominator = torch.logsumexp(logits, dim=1)

    # Numerators: sum_p z_i.z_p over i's positives = z_i . (sum of its class) - z_i.z_i.
    # Computed from per-class sums in O(N * D), so no N x N positive mask is ever built.
    _, class_of, class_sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    class_sums = torch.zeros(
        len(class_sizes), features.shape[1], dtype=features.dtype, device=features.device
    ).index_add_(0, class_of, features)
    positive_dot = (features * class_sums[class_of]).sum(dim=1) - (features * features).sum(dim=1)
    positive_counts = class_sizes[class_of] - 1
    has_positive = positive_counts > 0
    if not bool(has_positive.any()):
        return features.sum() * 0.0
    mean_positive_logit = positive_dot[has_positive] / temperature / positive_counts[has_positive]
    return (log_denominator[has_positive] - mean_positive_logit).mean()
