"""``--frozen-stages``: the stem and the first stages of a backbone kept at their starting
weights. A stage is one of timm's coarse parameter groups (``group_matcher(coarse=True)``): the
stem, then an EfficientNet's block stages, a ResNet's layers or a ViT's blocks, then what
follows them. A frozen stage's parameters take no gradient, so backpropagation stops above it
(a step costs less), and its BatchNorm layers keep their running statistics
(``backbone.training_mode``)."""

from __future__ import annotations

from timm.models import group_parameters
from torch import nn


def stages(backbone: nn.Module) -> list[list[str]]:
    """The backbone's parameter names stage by stage, the stem first; ``ValueError`` for a
    backbone that does not say its stages."""
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        raise ValueError(f"{type(backbone).__name__} does not name its stages (timm's "
                         "group_matcher)")
    groups = group_parameters(backbone, matcher(coarse=True))
    return [groups[key] for key in sorted(groups)]


def stage_count(backbone: nn.Module) -> int | None:
    """How many stages follow the backbone's stem; None for one that does not say."""
    try:
        return len(stages(backbone)) - 1
    except ValueError:
        return None


def freeze_stages(model: nn.Module, count: int) -> int:
    """Stop the stem and the ``count`` stages after it of ``model.backbone`` from training;
    returns how many weights that keeps. ``ValueError`` when the backbone has no stages, or not
    enough for one of them to go on training."""
    if count == 0:
        return 0
    groups = stages(model.backbone)
    if count > len(groups) - 2:
        raise ValueError(f"the model has {len(groups) - 1} stages after its stem and one must "
                         f"train: give 0 to {max(0, len(groups) - 2)}")
    frozen = {name for group in groups[:count + 1] for name in group}
    kept = 0
    for name, parameter in model.backbone.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
            kept += parameter.numel()
    return kept


def frozen(module: nn.Module) -> bool:
    """Whether ``module`` has parameters and none of them trains."""
    parameters = list(module.parameters(recurse=False))
    return bool(parameters) and not any(p.requires_grad for p in parameters)
