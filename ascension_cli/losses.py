"""Supervised Contrastive loss (Khosla et al. 2020, the L_out form) as a pure function, the
instance term and the Proxy-Anchor term (Kim et al. 2020) that can join it, and any
pytorch-metric-learning loss wrapped to take the same whole batch."""

from __future__ import annotations

import torch

from ascension_cli.config.fields import pml_loss_class

# Up to this many rows (views included) the positives come from an N x N label mask, beyond it
# from per-class sums; both give the same loss.
MASK_ROWS = 512


def rows_of(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V, D) embeddings and (N,) labels as one row per view: (N*V, D) and (N*V,)."""
    if embeddings.dim() == 3:
        views = embeddings.shape[1]
        return embeddings.reshape(-1, embeddings.shape[-1]), labels.repeat_interleave(views)
    return embeddings, labels


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
    is ``mean_p a_ip - logsumexp_a a_ia``, only the denominators need the N x N similarity
    matrix; the positive terms come from a label mask over it up to ``MASK_ROWS`` rows, and from
    per-class sums in O(N * D) beyond (faster there, measured in ``benchmarks/bench_loss.py``).
    No step waits on the device: anchors without positives are weighted out, not indexed out.
    """
    embeddings, labels = rows_of(embeddings, labels)
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
    # before exponentiating, so exp() cannot overflow however small tau is. Scaling one operand
    # by 1/tau saves a pass over the N x N matrix.
    logits = (features / temperature) @ features.T
    logits.diagonal().fill_(float("-inf"))  # an anchor is not its own "other"
    log_denominator = torch.logsumexp(logits, dim=1)

    if n <= MASK_ROWS:
        # Numerators from the logits already there: the sum over i's positives of a_ip.
        positive = labels[:, None] == labels[None, :]
        positive.fill_diagonal_(False)
        positive_counts = positive.sum(dim=1)
        positive_logits = torch.where(positive, logits, 0.0).sum(dim=1)
    else:
        # sum_p z_i.z_p over i's positives = z_i . (sum of its class - z_i), from per-class
        # sums: no second N x N matrix is built.
        _, class_of, class_sizes = torch.unique(labels, return_inverse=True, return_counts=True)
        class_sums = torch.zeros(
            len(class_sizes), features.shape[1], dtype=features.dtype, device=features.device
        ).index_add_(0, class_of, features)
        positive_logits = (features * (class_sums[class_of] - features)).sum(dim=1) / temperature
        positive_counts = class_sizes[class_of] - 1
    has_positive = positive_counts > 0
    per_anchor = log_denominator - positive_logits / positive_counts.clamp_min(1)
    return (per_anchor * has_positive).sum() / has_positive.sum().clamp_min(1)


# ---- Proxy-Anchor (Kim et al. 2020): one learned proxy per class, beside SupCon
PROXY_MARGIN, PROXY_ALPHA = 0.1, 32.0  # the paper's delta and alpha


def proxy_anchor_loss(embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor,
                      margin: float = PROXY_MARGIN, alpha: float = PROXY_ALPHA) -> torch.Tensor:
    """Proxy-Anchor over every row of the batch (rows and proxies compared by cosine).

    Args:
        embeddings: (N, D) vectors, one row per view; labels: (N,) in [0, C).
        proxies: (C, D), one per class.

    ``L = 1/|P+| sum_{p in P+} log(1 + sum_{x of p's class} exp(-alpha (s(x, p) - margin)))
    + 1/C sum_p log(1 + sum_{x of other classes} exp(alpha (s(x, p) + margin)))``, with P+ the
    proxies whose class is in the batch. Each ``log(1 + sum exp)`` is the softplus of a
    log-sum-exp over a masked column, stable at any alpha; empty columns count 0 (weighted out,
    not indexed out). Computed in fp32.
    """
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
    cosine = (torch.nn.functional.normalize(embeddings.float(), dim=-1)
              @ torch.nn.functional.normalize(proxies.float(), dim=-1).T)
    own = labels.to(cosine.device)[:, None] == torch.arange(proxies.shape[0],
                                                            device=cosine.device)[None, :]
    hidden = torch.tensor(float("-inf"), device=cosine.device)
    pull = torch.logsumexp(torch.where(own, -alpha * (cosine - margin), hidden), dim=0)
    push = torch.logsumexp(torch.where(own, hidden, alpha * (cosine + margin)), dim=0)
    present = own.any(dim=0)
    positive = (torch.nn.functional.softplus(pull) * present).sum() / present.sum().clamp_min(1)
    return positive + torch.nn.functional.softplus(push).mean()


def supcon_with_instances(embeddings: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 0.1, instance_weight: float = 0.0) -> torch.Tensor:
    """``(1 - w) x`` SupCon over the classes ``+ w x`` SupCon over the photos (``--instance-weight``
    w): in the second term a view's only positives are the other views of its own photo
    (SimCLR's NT-Xent), so the photos of a class are also told apart from each other rather than
    pulled onto one point (Chen et al. 2022). ``embeddings`` (N, V, D) with V >= 2 where w > 0:
    with one view a photo has nothing to be pulled toward."""
    classes = supcon_loss(embeddings, labels, temperature)
    if not instance_weight:
        return classes
    if embeddings.dim() != 3 or embeddings.shape[1] < 2:
        raise ValueError("an instance term needs two views or more of each photo")
    photos = torch.arange(embeddings.shape[0], device=labels.device)
    return ((1 - instance_weight) * classes
            + instance_weight * supcon_loss(embeddings, photos, temperature))


class SupConWithProxies(torch.nn.Module):
    """SupCon (with its instance term, ``instance_weight``) plus ``weight`` x Proxy-Anchor, over
    the same rows: the trainer's loss with ``--proxy-weight``. Its proxies are this module's
    parameters (the optimizer trains them at their own LR, a checkpoint keeps them), started as
    the paper's code does (Kaiming normal, fan out)."""

    def __init__(self, num_classes: int, embedding_size: int, temperature: float,
                 weight: float, generator: torch.Generator | None = None,
                 instance_weight: float = 0.0):
        super().__init__()
        proxies = torch.empty(num_classes, embedding_size)
        std = (2.0 / num_classes) ** 0.5  # kaiming_normal_(mode="fan_out"), our own generator
        self.proxies = torch.nn.Parameter(proxies.normal_(0.0, std, generator=generator))
        self.temperature, self.weight = temperature, weight
        self.instance_weight = instance_weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        contrast = supcon_with_instances(embeddings, labels, self.temperature,
                                         self.instance_weight)
        return contrast + self.weight * proxy_anchor_loss(*rows_of(embeddings, labels),
                                                          self.proxies)


# ---- any pytorch-metric-learning loss, over the whole (cached) batch


class PMLLoss(torch.nn.Module):
    """A pytorch-metric-learning loss as the trainer's loss: embeddings (N, V, D) or (N, D) and
    labels (N,) in, a scalar out, over every row at once (the gradient-cached step hands it the
    whole target batch). Its own parameters (proxies) are this module's, so the optimizer
    trains them and a checkpoint keeps them."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings, labels = rows_of(embeddings, labels)
        return self.loss(embeddings.float(), labels.to(embeddings.device))


def pml_loss(name: str, options: dict, num_classes: int, embedding_size: int) -> PMLLoss:
    """``pytorch_metric_learning.losses.<name>(**options)``; ``num_classes`` and
    ``embedding_size`` filled in for the losses that take them (those with proxies)."""
    import inspect

    kind = pml_loss_class(name)
    parameters = inspect.signature(kind.__init__).parameters
    accepted = {key for cls in kind.__mro__ if "__init__" in vars(cls)
                for key, parameter in inspect.signature(cls.__init__).parameters.items()
                if key != "self" and parameter.kind not in (parameter.VAR_POSITIONAL,
                                                            parameter.VAR_KEYWORD)}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{name} takes no option {unknown[0]!r}; it takes "
                         + ", ".join(sorted(accepted - {"num_classes", "embedding_size"})))
    given = dict(options)
    for key, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
        if key in parameters and key not in given:
            given[key] = value
    try:
        loss = PMLLoss(kind(**given))
        _try_on_a_small_batch(loss, num_classes, embedding_size)
    except Exception as exc:  # an option of a type the loss cannot use: say so before training
        raise ValueError(f"{name}({', '.join(f'{k}={v!r}' for k, v in options.items())}) on "
                         f"the data's {num_classes} classes: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None
    return loss


def _try_on_a_small_batch(loss: PMLLoss, num_classes: int, embedding_size: int) -> None:
    """One forward and backward pass on random unit vectors of the data's first two and last
    two classes, two of each (its own generator: the run's random streams are untouched), so
    that an option that does not fit the data (``num_classes`` too small) or makes every step
    useless (a loss or gradient of NaN or infinity) is refused before training."""
    generator = torch.Generator().manual_seed(0)
    classes = sorted({0, 1, max(0, num_classes - 2), max(0, num_classes - 1)})
    labels = torch.tensor([label for label in classes for _ in range(2)])
    embeddings = torch.nn.functional.normalize(
        torch.randn(len(labels), embedding_size, generator=generator), dim=-1).requires_grad_()
    value = loss(embeddings, labels)
    if value.dim() != 0:
        raise ValueError(f"it gives a tensor of shape {tuple(value.shape)}, not one number")
    if not torch.isfinite(value):
        raise ValueError(f"it gives a loss of {value.item()} on a trial batch: every step "
                         "would be skipped")
    gradients = torch.autograd.grad(value, [embeddings, *loss.parameters()], allow_unused=True)
    if not all(torch.isfinite(g).all() for g in gradients if g is not None):
        raise ValueError("its gradient on a trial batch holds NaN or infinity: every step "
                         "would be skipped")
