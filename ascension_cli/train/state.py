"""Everything about a run that changes as it trains, in one record with one ``state_dict`` /
``load_state_dict`` pair: a checkpoint saves exactly this (with the optimizer, scheduler, scaler
and the files excluded so far) and a resume loads exactly this.

The keys are those checkpoints have always had, so older checkpoints resume; a key a checkpoint
lacks (``consecutive_nonfinite`` before it was saved) takes its fresh value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ascension_cli.train.logbook import EpochRecord


@dataclass
class EpochProgress:
    """Where an interrupted epoch stands; a resume carries on from exactly here."""

    batches_done: int = 0
    losses: list[float] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    waited: float = 0.0  # seconds spent waiting for data


def rng_state() -> dict[str, Any]:
    """The torch RNG streams (CPU, and CUDA when in use)."""
    payload: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        payload["cuda"] = torch.cuda.get_rng_state_all()
    return payload


def restore_rng(payload: dict[str, Any]) -> None:
    torch.set_rng_state(payload["torch"])
    states = payload.get("cuda")
    if states and torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


@dataclass
class TrainState:
    """The run's counters, history and mid-epoch progress. ``epoch`` is the last one finished."""

    epoch: int = 0
    step: int = 0
    best: float | None = None  # best validation Recall@1 of a trained epoch
    nonfinite_total: int = 0
    consecutive_nonfinite: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    progress: EpochProgress | None = None  # of an epoch interrupted part-way

    def state_dict(self, progress: EpochProgress | None = None) -> dict[str, Any]:
        """The checkpoint's keys for this state (``progress``: of the epoch being saved
        part-way), with the RNG streams as they are now."""
        return {
            "epoch": self.epoch, "step": self.step, "best_recall_at_1": self.best,
            "nonfinite_steps": self.nonfinite_total,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "history": [asdict(record) for record in self.history],
            "epoch_progress": None if progress is None else asdict(progress),
            "rng": rng_state(),
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Take a checkpoint's state, and its RNG streams."""
        self.epoch, self.step = payload["epoch"], payload["step"]
        self.best = payload.get("best_recall_at_1")
        self.nonfinite_total = payload.get("nonfinite_steps", 0)
        self.consecutive_nonfinite = payload.get("consecutive_nonfinite", 0)
        self.history = [EpochRecord(**record) for record in payload["history"]]
        saved = payload.get("epoch_progress")
        self.progress = None if saved is None else EpochProgress(**saved)
        restore_rng(payload["rng"])


class Recorded:
    """A choice made once for a run (``--augment auto``'s), kept in its checkpoints: a stateful
    part whose state is the choice, read back by ``train/build.py`` before the run is built."""

    def __init__(self, values: dict[str, Any]):
        self.values = dict(values)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, values: dict[str, Any]) -> None:
        self.values = dict(values)
