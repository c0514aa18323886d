"""Learning-rate schedule and optimizer set-up, kept apart from the loop (as timm does)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ascension_cli.config import COSINE_FLOOR, LR_REFERENCE_BATCH, WARMUP_SHARE


def warmup_then(schedule: str, total_steps: int, warmup_steps: int):
    """LR multiplier per optimizer step for ``--lr-schedule``: linear warmup to 1, then
    ``constant`` (1 to the end) or ``cosine`` (decay to ``COSINE_FLOOR``)."""
    floors = {"constant": 1.0, "cosine": COSINE_FLOOR}
    if schedule not in floors:
        raise ValueError(f"unknown LR schedule {schedule!r}")
    return warmup_cosine(total_steps, warmup_steps, floors[schedule])


def warmup_cosine(
    total_steps: int, warmup_steps: int, min_ratio: float = COSINE_FLOOR
):
    """LR multiplier per optimizer step: linear warmup to 1, then cosine decay to ``min_ratio``."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def scaled_lr(lr: float, target_batch: int, rule: str) -> float:
    """The learning rate of a step over ``target_batch`` images, from ``lr`` for
    ``LR_REFERENCE_BATCH`` images: ``linear`` keeps lr x steps per epoch constant, so a larger
    contrastive batch, with fewer steps, still moves the weights as far in the same epochs."""
    ratio = target_batch / LR_REFERENCE_BATCH
    factors = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}
    if rule not in factors:
        raise ValueError(f"unknown LR scaling {rule!r}")
    return lr * factors[rule]


def warmup_steps(warmup_epochs: float | None, steps_per_epoch: int, total_steps: int) -> int:
    """Warmup length in optimizer steps: ``warmup_epochs`` when given, else ``WARMUP_SHARE``
    of the run, so a short run does not spend most of its few steps warming up."""
    if warmup_epochs is None:
        return round(WARMUP_SHARE * total_steps)
    return round(warmup_epochs * steps_per_epoch)


def adamw(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0
) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and normalisation weights (1-d parameters), and
    ``backbone_lr_scale * lr`` for the parameters under ``model.backbone``.

    With the scale at 1 there are two groups (decay, no decay), as in earlier versions, so
    their checkpoints' optimizer states still load.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            backbone = backbone_lr_scale != 1.0 and name.startswith("backbone.")
            groups.setdefault((backbone, parameter.ndim <= 1), []).append(parameter)
    return torch.optim.AdamW(
        [
            {"params": params, "lr": lr * (backbone_lr_scale if backbone else 1.0),
             "weight_decay": 0.0 if flat else weight_decay}
            for (backbone, flat), params in sorted(groups.items())
        ],
        lr=lr,
    )
