"""Everything about a run that changes as it trains, in one record with one ``state_dict`` /
``load_state_dict`` pair: a checkpoint saves exactly this (with the optimizer, scheduler, scaler
and the files excluded so far) and a resume loads exactly this.

The keys are those checkpoints have always had, so older checkpoints resume; a key a checkpoint
lacks (``consecutive_nonfinite`` before it was saved) takes its fresh value.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ascension_cli.errors import first_line
from ascension_cli.model.checkpoint import damaged_entry, finite_weights
from ascension_cli.train.logbook import METRICS, EpochRecord
from ascension_cli.values import number, whole

FINITE = sys.float_info.max  # the largest a float read back may be: infinity is no time or LR


@dataclass
class EpochProgress:
    """Where an interrupted epoch stands; a resume carries on from exactly here."""

    batches_done: int = 0
    losses: list[float] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    waited: float = 0.0  # seconds spent waiting for data


class DamagedEntry(ValueError):
    """A checkpoint entry a resume cannot use: ``key`` names it (the trainer's one
    CheckpointError says which entry, of which file)."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def count_entry(payload: dict[str, Any], key: str, default: int | None = None) -> int:
    """A whole number from 0 the checkpoint holds under ``key`` (``default`` where an older one
    lacks it; None: it must be there)."""
    if key not in payload:
        if default is None:
            raise DamagedEntry(key, "missing")
        return default
    if not whole(payload[key]):
        raise DamagedEntry(key, f"must be a whole number from 0, not {str(payload[key])[:40]}")
    return payload[key]


def _number(value: Any, kind: str) -> bool:
    """Whether ``value`` fits a record field annotated ``kind`` ("float | None", "int"...)."""
    if value is None:
        return "None" in kind
    if kind.startswith("bool"):
        return isinstance(value, bool)
    return whole(value) if kind.startswith("int") else number(value)


def _record(entry: Any, number: int) -> EpochRecord:
    """One history entry as an ``EpochRecord``, each field of its kind."""
    where = f"history[{number}]"
    if not isinstance(entry, dict):
        raise DamagedEntry("history", f"{where} is not a record")
    kinds = {item.name: str(item.type) for item in fields(EpochRecord)}
    unknown = sorted(set(entry) - set(kinds))
    if unknown:
        raise DamagedEntry("history", f"{where} has no field {unknown[0][:40]!r}")
    try:
        record = EpochRecord(**entry)
    except TypeError:
        raise DamagedEntry("history", f"{where} lacks a field") from None
    wrong = [name for name, kind in kinds.items() if not _number(getattr(record, name), kind)]
    if wrong:
        raise DamagedEntry("history", f"{where}.{wrong[0]} is not a {kinds[wrong[0]]}")
    return record


def _history(payload: dict[str, Any]) -> list[EpochRecord]:
    if not isinstance(payload.get("history"), list):
        raise DamagedEntry("history", "missing, or not a list of epoch records")
    return [_record(entry, number) for number, entry in enumerate(payload["history"])]


def metrics_history(save_dir: Path) -> list[EpochRecord] | None:
    """The records of a finished run's metrics.jsonl, each checked as a checkpoint's; they
    hold best.pt's search among the training photos, measured after last.pt was written. None
    where the file is missing or damaged."""
    try:
        lines = (save_dir / METRICS).read_text(encoding="utf-8").splitlines()
        return [_record(json.loads(line), number) for number, line in enumerate(lines)]
    except (OSError, ValueError):  # DamagedEntry and a JSON or UTF-8 error are ValueErrors
        return None


def _progress(saved: Any) -> EpochProgress | None:
    """An interrupted epoch's progress, each field of its kind."""
    if saved is None:
        return None
    try:
        progress = EpochProgress(**saved)
    except TypeError:
        raise DamagedEntry("epoch_progress", "not an epoch's progress") from None
    counts = (progress.batches_done, progress.images)
    times = (progress.seconds, progress.waited)
    if (not all(whole(count) for count in counts)
            or not all(number(time, 0, FINITE) for time in times)
            or not isinstance(progress.losses, list)
            or not all(number(loss) for loss in progress.losses)):
        raise DamagedEntry("epoch_progress", "a count, time or loss of the wrong kind")
    return progress


def _best(payload: dict[str, Any]) -> float | None:
    best = payload.get("best_recall_at_1")
    if best is not None and not number(best, 0, 1):
        raise DamagedEntry("best_recall_at_1", f"must be a recall from 0 to 1, not {best!r:.40}")
    return best


def rng_state() -> dict[str, Any]:
    """The torch RNG streams (CPU, and CUDA when in use)."""
    payload: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        payload["cuda"] = torch.cuda.get_rng_state_all()
    return payload


def restore_rng(payload: Any) -> None:
    """The RNG streams a checkpoint saved; ``DamagedEntry`` ("rng") for anything else."""
    state = payload.get("torch") if isinstance(payload, dict) else None
    if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
        raise DamagedEntry("rng", "missing, or not the RNG state torch saved")
    try:
        torch.set_rng_state(state)
    except (RuntimeError, ValueError, TypeError):
        raise DamagedEntry("rng", "not the RNG state torch saved") from None
    states = payload.get("cuda")
    if states and torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


@dataclass
class TrainState:
    """The run's counters, history and mid-epoch progress. ``epoch`` is the last one finished."""

    epoch: int = 0
    step: int = 0
    best: float | None = None  # best validation Recall@1 so far, the starting weights' included
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
        """Take a checkpoint's state, and its RNG streams, each entry checked first: one that
        is missing or of the wrong kind is a ``DamagedEntry`` naming it, and nothing is
        taken."""
        epoch, step = count_entry(payload, "epoch"), count_entry(payload, "step")
        nonfinite = count_entry(payload, "nonfinite_steps", 0)
        consecutive = count_entry(payload, "consecutive_nonfinite", 0)
        best, history = _best(payload), _history(payload)
        progress = _progress(payload.get("epoch_progress"))
        restore_rng(payload.get("rng"))
        self.epoch, self.step, self.best = epoch, step, best
        self.nonfinite_total, self.consecutive_nonfinite = nonfinite, consecutive
        self.history, self.progress = history, progress


def _check_scaler(payload: Any) -> None:
    """Before loading: a disabled scaler (bf16, fp32) ignores what it is given."""
    if not isinstance(payload, dict) or not number(payload.get("scale", 1.0), 0, FINITE):
        raise ValueError("not a loss scaler's state (a scale above 0)")


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """After loading: LRs from 0, and each weight's moments of its weight's shape (torch checks
    the groups' sizes, not the moments')."""
    for group in optimizer.param_groups:
        if not number(group.get("lr"), 0, FINITE):
            raise ValueError(f"a learning rate of {group.get('lr')!r:.40}")
        for weight in group["params"]:
            for name, value in optimizer.state.get(weight, {}).items():
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    continue
                if value.shape != weight.shape:
                    raise ValueError(f"its {name} of shape {tuple(value.shape)} does not fit a "
                                     f"weight of shape {tuple(weight.shape)}")
                if not torch.isfinite(value).all():
                    raise ValueError(f"its {name} holds NaN or infinity")


def _check_scheduler(scheduler) -> None:
    """After loading: a step count from 0 and an LR from 0 for each group."""
    count, base = scheduler.last_epoch, scheduler.base_lrs
    if not whole(count):
        raise ValueError(f"a step count of {count!r:.40}")
    if (not isinstance(base, list) or len(base) != len(scheduler.optimizer.param_groups)
            or not all(number(lr, 0, FINITE) for lr in base)):
        raise ValueError("its base learning rates do not fit the optimizer's groups")


# Checks of a part's state beyond what its own load_state_dict makes: before it is loaded
# (what the part would ignore or take unchecked), and of the part after.
_BEFORE = {"scaler": _check_scaler, "loss": finite_weights}
_AFTER = {"optimizer": _check_optimizer, "scheduler": _check_scheduler}


def load_parts(parts: dict[str, Any], payload: dict[str, Any], source: Path) -> None:
    """Each resumable part's state from a checkpoint; a part missing or damaged there (a file
    edited by hand, or written by another program: missing, of the wrong kind, shape or range)
    is one CheckpointError naming it."""
    for key, part in parts.items():
        state = payload.get(key, []) if key == "excluded" else payload.get(key)
        try:
            if key not in payload and key != "excluded":
                raise KeyError("missing")
            _BEFORE.get(key, lambda _: None)(state)
            part.load_state_dict(state)
            _AFTER.get(key, lambda _: None)(part)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
            raise damaged_entry(source, key, first_line(exc)) from None


def load_state(state: TrainState, payload: dict[str, Any], source: Path) -> None:
    """``state.load_state_dict(payload)``; an entry it cannot use is one CheckpointError naming
    the entry and ``source``."""
    try:
        state.load_state_dict(payload)
    except DamagedEntry as exc:
        raise damaged_entry(source, exc.key, exc.why) from None
