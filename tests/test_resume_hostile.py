"""A resume treats every entry of a checkpoint as hostile: each one it reads, damaged one at a
time (missing, of the wrong type, of the wrong shape, out of range), ends in one CheckpointError
naming that entry, or the run resumes as it would have (an entry older checkpoints lacked)."""

from __future__ import annotations

import math

import pytest
import torch

from ascension_cli.errors import CheckpointError
from ascension_cli.train.loop import train
from tests.conftest import make_dataset
from tests.test_train import config

# Everything a run with a weight average, a proxy term and --augment auto saves and reads back.
OPTIONS = dict(ema_decay=0.5, proxy_weight=0.3, augment="auto", warmup_epochs=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_dataset(root / "data")
    train(config(data, root / "run", epochs=2, **OPTIONS),
          stop_after_epoch=lambda epoch: epoch == 1)
    return data, torch.load(root / "run" / "last.pt", weights_only=True)


def _first_tensor(state: dict) -> str:
    return next(key for key, value in state.items() if value.is_floating_point())


def _reshaped(state: dict) -> dict:
    key = _first_tensor(state)
    return {**state, key: torch.zeros(3, 1)}


def _with_nan(state: dict) -> dict:
    key = _first_tensor(state)
    return {**state, key: torch.full_like(state[key], math.nan)}


def _optimizer_moments(payload: dict, value) -> dict:
    state = {**payload["optimizer"], "state": dict(payload["optimizer"]["state"])}
    first = next(iter(state["state"]))
    state["state"][first] = {**state["state"][first], "exp_avg": value}
    return state


def _history(payload: dict, **changes) -> list:
    return [{**payload["history"][0], **changes}, *payload["history"][1:]]


# entry -> {damage: the entry's new value, from the saved payload}
DAMAGES = {
    "model": {"shape": lambda p: _reshaped(p["model"]), "range": lambda p: _with_nan(p["model"])},
    "spec": {"shape": lambda p: {"name": "test_convnext"},
             "range": lambda p: {**p["spec"], "image_size": -5}},
    "config": {"shape": lambda p: {1: "x"}},
    "classes": {"shape": lambda p: p["classes"][:2], "range": lambda p: [1, 2, 3, 4]},
    # The choice of --augment auto as checkpoints before the plan held it kept it.
    "augmentation": {"shape": lambda p: {}, "range": lambda p: {"chosen": "sepia"}},
    "optimizer": {"shape": lambda p: _optimizer_moments(p, torch.zeros(2, 2)),
                  "range": lambda p: _optimizer_moments(
                      p, torch.full_like(p["optimizer"]["state"][0]["exp_avg"], math.inf))},
    "scheduler": {"shape": lambda p: {**p["scheduler"], "base_lrs": [1e-3]},
                  "range": lambda p: {**p["scheduler"], "last_epoch": -7}},
    "scaler": {"range": lambda p: {**p["scaler"], "scale": -1.0}},
    "excluded": {"shape": lambda p: [[1, 2]], "range": lambda p: [10**9]},
    "loss": {"shape": lambda p: _reshaped(p["loss"]), "range": lambda p: _with_nan(p["loss"])},
    "average": {"shape": lambda p: {"trained": _reshaped(p["average"]["trained"]),
                                    "steps": p["average"]["steps"]},
                "range": lambda p: {**p["average"], "steps": -10}},
    "epoch": {"range": lambda p: -1},
    "step": {"range": lambda p: -3},
    "best_recall_at_1": {"range": lambda p: 2.0},
    "nonfinite_steps": {"range": lambda p: -1},
    "consecutive_nonfinite": {"range": lambda p: -1},
    "history": {"shape": lambda p: _history(p, extra=1),
                "range": lambda p: _history(p, lr=math.nan)},
    "epoch_progress": {"shape": lambda p: {"batches_done": 1, "pages": 2},
                       "range": lambda p: {"batches_done": -1, "losses": [], "images": 0,
                                           "seconds": 0.0, "waited": 0.0}},
    "plan": {"shape": lambda p: {"classes": 4},
             "range": lambda p: {**p["plan"], "temperature": -1.0},
             "choice": lambda p: {**p["plan"], "augmentation": "sepia"},
             "stages": lambda p: {**p["plan"], "frozen_stages": -2}},
    "rng": {"shape": lambda p: {"torch": torch.zeros(5, dtype=torch.uint8)},
            "range": lambda p: {"torch": p["rng"]["torch"].float()}},
}
# Entries older checkpoints lacked: without them a run resumes as those did.
OPTIONAL = {"plan", "augmentation", "excluded", "best_recall_at_1", "nonfinite_steps",
            "consecutive_nonfinite", "epoch_progress"}
CASES = [(entry, "missing") for entry in DAMAGES] + [(entry, "type") for entry in DAMAGES] + [
    (entry, damage) for entry, damages in DAMAGES.items() for damage in damages]


@pytest.mark.parametrize(("entry", "damage"), CASES, ids=[f"{e}-{d}" for e, d in CASES])
def test_each_damaged_entry_is_one_error_naming_it(saved, tmp_path, entry, damage):
    data, payload = saved
    if entry == "augmentation":  # read only from a checkpoint whose plan lacks the choice
        payload = {**payload, "plan": {key: value for key, value in payload["plan"].items()
                                       if key not in ("augmentation", "image_size", "workers")},
                   "augmentation": {"chosen": payload["plan"]["augmentation"]}}
    if damage == "missing":
        spoilt = {key: value for key, value in payload.items() if key != entry}
    else:
        spoilt = {**payload, entry: "text" if damage == "type" else DAMAGES[entry][damage](payload)}
    path = tmp_path / "spoilt.pt"
    torch.save(spoilt, path)
    resume = config(data, tmp_path / "again", epochs=1, resume=str(path), **OPTIONS)
    if damage == "missing" and entry in OPTIONAL:
        train(resume)  # an older checkpoint's resume: nothing left to train, no error
        return
    with pytest.raises(CheckpointError) as refused:
        train(resume)
    message = str(refused.value)
    assert entry in message or (entry in ("classes", "config") and "cannot resume" in message), (
        message)
    assert "\n" not in message


def test_a_history_from_before_recall_at_5_was_kept_resumes(saved, tmp_path):
    """Records written before validation kept recall@5 and MAP@R lack both: the run resumes,
    its older epochs without them and its new ones with them."""
    data, payload = saved
    older = [{key: value for key, value in record.items()
              if key not in ("val_recall_at_5", "val_map_at_r")} for record in payload["history"]]
    path = tmp_path / "older.pt"
    torch.save({**payload, "history": older}, path)
    result = train(config(data, tmp_path / "again", epochs=2, resume=str(path), **OPTIONS))
    assert [record.epoch for record in result.history] == [0, 1, 2]
    assert [record.val_recall_at_5 for record in result.history[:2]] == [None, None]
    latest = result.history[2]
    assert latest.val_recall_at_1 <= latest.val_recall_at_5 <= 1 and 0 <= latest.val_map_at_r <= 1
