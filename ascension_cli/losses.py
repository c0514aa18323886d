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
    log-sum-exp overflow.
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
    logits = features @ features.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    # Row-max subtraction keeps exp() finite; it cancels in the log-softmax.
    logits = logits - logits.detach().masked_fill(self_mask, float("-inf")).amax(
        dim=1, keepdim=True
    ).clamp_min(-1e4)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)

    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    positive_counts = positives.sum(dim=1)
    has_positive = positive_counts > 0
    # where() rather than multiplying: -inf * 0 on the diagonal would be NaN.
    positive_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -positive_log_prob / positive_counts.clamp_min(1)
    if not bool(has_positive.any()):
        return features.sum() * 0.0
    return per_anchor[has_positive].mean()
