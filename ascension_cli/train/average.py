"""An exponential moving average of the weights (``--ema-decay``).

Training steps the model's own weights; validation, ``best.pt`` and ``last.pt`` hold the
average. A checkpoint's ``model`` is therefore the average (what embed, eval, index and export
load), and its ``average`` entry keeps the trained weights and the step count, so that a resume
carries on both exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from ascension_cli.model.checkpoint import finite_weights
from ascension_cli.values import whole

# The average's share kept per step ramps up as (1 + n) / (WARMUP + n) after n steps, so the
# starting weights fade within the first steps (as timm's ModelEmaV3 warmup does).
WARMUP = 10


def kept_share(decay: float, steps: int) -> float:
    """The share of the old average kept at the ``steps``-th update: ``decay``, ramped up."""
    return min(decay, (1 + steps) / (WARMUP + steps))


def copied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict's tensors, detached and cloned (a model's weights kept aside)."""
    return {key: value.detach().clone() for key, value in state.items()}


class WeightAverage:
    """The average of ``model``'s weights over its optimizer steps; BatchNorm statistics are
    averaged too, integer buffers (step counters) follow the model."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the average's decay must lie between 0 and 1, not {decay}")
        self.model, self.decay, self.steps = model, decay, 0
        self.average = copied(model.state_dict())
        self._trained: dict[str, torch.Tensor] | None = None  # held while the average is in

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's weights after an optimizer step into the average."""
        self.steps += 1
        keep = kept_share(self.decay, self.steps)
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                self.average[key].lerp_(value.detach(), 1.0 - keep)
            else:
                self.average[key].copy_(value)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block and its trained weights after it."""
        if self._trained is not None:  # already applied by an enclosing block
            yield
            return
        self._trained = copied(self.model.state_dict())
        self.model.load_state_dict(self.average)
        try:
            yield
        finally:
            self.model.load_state_dict(self._trained)
            self._trained = None

    def state_dict(self) -> dict[str, Any]:
        """The trained weights and the step count (a checkpoint's model is the average, so
        the average is not stored twice), inside ``applied`` or out of it."""
        trained = self._trained if self._trained is not None else copied(self.model.state_dict())
        return {"trained": trained, "steps": self.steps}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Resume: the model, loaded from the checkpoint, holds the average; put the trained
        weights back into it."""
        steps, trained = payload["steps"], payload["trained"]
        if not whole(steps):
            # A negative count would extrapolate (a kept share below 0) or divide by zero.
            raise ValueError(f"its step count must be a whole number from 0, not {steps!r:.40}")
        finite_weights(trained)
        average = copied(self.model.state_dict())
        self.model.load_state_dict(trained)
        self.average, self.steps = average, steps


def applied(average: WeightAverage | None) -> AbstractContextManager:
    """``average.applied()``, or nothing to do when there is no average."""
    return average.applied() if average is not None else nullcontext()
