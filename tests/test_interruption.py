"""Interrupted runs lose nothing: SIGINT/SIGTERM save and stop, kill -9 never corrupts."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ascension_cli.config import TrainConfig
from ascension_cli.errors import Interrupted
from ascension_cli.model.checkpoint import load_checkpoint
from ascension_cli.train.loop import Reporter, train
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def options(data, save_dir, **overrides):
    values = dict(
        data_root=data, save_dir=save_dir, model="test_convnext", pretrained=False,
        image_size=32, batch_size=4, target_batch=8, samples_per_class=2, epochs=3,
        warmup_epochs=1, lr=1e-3, workers=0, val_fraction=0.25, seed=0,
    )
    values.update(overrides)
    return values


class SignalAtStep(Reporter):
    """Sends this process a signal after the given optimizer step, as a user or scheduler would."""

    def __init__(self, at_step: int, number: int):
        self.at_step, self.number, self.steps = at_step, number, 0

    def step(self, loss, lr, images_per_second):
        self.steps += 1
        if self.steps == self.at_step:
            os.kill(os.getpid(), self.number)


def same_weights(a: Path, b: Path) -> bool:
    first = torch.load(a, weights_only=True)["model"]
    second = torch.load(b, weights_only=True)["model"]
    return all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(("at_step", "number"), [(2, signal.SIGINT), (4, signal.SIGTERM)])
def test_signal_mid_epoch_saves_and_resume_is_exact(tmp_path, at_step, number):
    data = make_dataset(tmp_path / "data")
    train(TrainConfig(**options(data, tmp_path / "whole")))

    before = signal.getsignal(signal.SIGINT)  # default, or ignored if started in background
    with pytest.raises(Interrupted) as stopped:
        train(TrainConfig(**options(data, tmp_path / "parts")), SignalAtStep(at_step, number))
    assert "resume auto" in str(stopped.value)
    assert stopped.value.exit_code == 128 + number
    saved = load_checkpoint(tmp_path / "parts" / "last.pt")
    assert saved["step"] == at_step
    # The handler is removed again: the test process keeps the Ctrl-C handling it had.
    assert signal.getsignal(signal.SIGINT) is before

    train(TrainConfig(**options(data, tmp_path / "parts", resume="auto", workers=1)))
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "parts" / "last.pt")


def signal_on_call(module, name: str, call: int, monkeypatch) -> None:
    """Wrap ``module.name`` so that its ``call``-th call first sends this process SIGTERM."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


# The untrained model embeds twice before the first step: the validation photos, then the
# training photos of --gallery-check.
@pytest.mark.parametrize(("where", "name", "call", "says"), [
    ("loading a step's micro-batches", "to_input", 3, "the step in progress was abandoned"),
    ("in the step's backward passes", "supcon_loss", 2, "the step in progress was abandoned"),
    ("validating an epoch", "extract_features", 3, "validation was abandoned"),
])
def test_a_signal_inside_a_step_or_validation_stops_there_and_resume_is_exact(
    tmp_path, monkeypatch, where, name, call, says
):
    from ascension_cli.train import build, loop, validation

    data = make_dataset(tmp_path / "data")
    train(TrainConfig(**options(data, tmp_path / "whole")))

    module = {"supcon_loss": build, "extract_features": validation}.get(name, loop)
    signal_on_call(module, name, call, monkeypatch)
    with pytest.raises(Interrupted) as stopped:
        train(TrainConfig(**options(data, tmp_path / "parts")))
    assert says in str(stopped.value), where
    monkeypatch.undo()

    train(TrainConfig(**options(data, tmp_path / "parts", resume="auto")))
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "parts" / "last.pt")
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")["history"]
    parts = load_checkpoint(tmp_path / "parts" / "last.pt")["history"]
    assert [r["val_recall_at_1"] for r in parts] == [r["val_recall_at_1"] for r in whole]


@pytest.mark.parametrize("call", [1, 2])
def test_a_signal_before_training_starts_stops_at_once(tmp_path, monkeypatch, call):
    from ascension_cli.train import validation

    data = make_dataset(tmp_path / "data")
    # the untrained model's validation, and its search among the training photos
    signal_on_call(validation, "extract_features", call, monkeypatch)
    with pytest.raises(Interrupted, match="before training started") as stopped:
        train(TrainConfig(**options(data, tmp_path / "run")))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert not (tmp_path / "run" / "last.pt").exists()


def test_sigterm_to_the_cli_exits_cleanly_with_resume_advice(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=16)
    command = [sys.executable, "-m", "ascension_cli", "train", str(data), "--model",
               "test_convnext", "--no-pretrained", "--image-size", "32", "--batch-size", "4",
               "--target-batch", "8", "--samples-per-class", "2", "--epochs", "200",
               "--warmup-epochs", "0", "--workers", "1", "--save-dir", str(tmp_path / "run")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out + err
    assert "stopped by SIGTERM" in err and "--resume auto" in err
    assert "Traceback" not in out + err
    load_checkpoint(tmp_path / "run" / "last.pt")


def test_kill_9_at_random_moments_never_corrupts_and_resumes_exactly(tmp_path):
    data = make_dataset(tmp_path / "data", classes=3, per_class=8)
    base = [sys.executable, "-m", "ascension_cli", "train", str(data), "--model",
            "test_convnext", "--no-pretrained", "--image-size", "32", "--batch-size", "4",
            "--target-batch", "4", "--samples-per-class", "2", "--epochs", "40",
            "--warmup-epochs", "1", "--workers", "0", "--val-fraction", "0.25"]
    subprocess.run(base + ["--save-dir", str(tmp_path / "whole")], check=True,
                   capture_output=True, cwd=ROOT, timeout=300)

    rng = random.Random(0)
    run = tmp_path / "killed"
    epochs_seen, killed_while_training = [], 0
    for _ in range(20):
        started = time.time()
        process = subprocess.Popen(base + ["--save-dir", str(run), "--resume", "auto"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   cwd=ROOT)
        # config.yaml is rewritten once the model is built: training starts right after.
        config_file = run / "config.yaml"
        while process.poll() is None and not (
            config_file.exists() and config_file.stat().st_mtime >= started
        ):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.2))  # a random moment: a step, a save, a validation
        killed_while_training += process.poll() is None
        process.kill()
        process.wait()
        if (run / "last.pt").exists():
            epochs_seen.append(load_checkpoint(run / "last.pt")["epoch"])  # never torn
        for leftover in run.glob(".last.pt.*"):  # a temp file a kill left behind is harmless
            leftover.unlink()
    assert killed_while_training >= 15
    assert epochs_seen == sorted(epochs_seen) and epochs_seen[-1] > epochs_seen[0]

    subprocess.run(base + ["--save-dir", str(run), "--resume", "auto"], check=True,
                   capture_output=True, cwd=ROOT, timeout=300)
    assert same_weights(tmp_path / "whole" / "last.pt", run / "last.pt")
