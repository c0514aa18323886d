"""Experiment trackers: what TensorBoard and MLflow hold is what metrics.jsonl says."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from ascension_cli.cli.app import app
from ascension_cli.config import TrainConfig
from ascension_cli.errors import ConfigError
from ascension_cli.train.loop import train

runner = CliRunner()


def options(data, save_dir, **overrides):
    values = dict(data_root=data, save_dir=save_dir, model="test_convnext", pretrained=False,
                  image_size=32, batch_size=4, target_batch=8, samples_per_class=2, epochs=2,
                  lr=1e-3, workers=0, val_fraction=0.25, seed=0)
    return TrainConfig(**{**values, **overrides})


def metrics(save_dir):
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_epoch_figures_and_every_step(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(options(dataset, run, tracker=["tensorboard"]))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    written = metrics(run)
    for figure in ("val_recall_at_1", "val_recall_at_5", "val_map_at_r"):
        logged = [(e.step, e.value) for e in events.Scalars(f"epoch/{figure}")]
        assert logged == [(r["epoch"], pytest.approx(r[figure])) for r in written]
    losses = [e.value for e in events.Scalars("epoch/loss")]
    assert losses == [pytest.approx(r["loss"]) for r in written if r["loss"] is not None]
    assert len(events.Scalars("train/lr")) == written[-1]["step"]
    assert "options/text_summary" in events.Tags()["tensors"]


def test_mlflow_run_continues_on_resume_and_keeps_the_artefacts(dataset, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    train(options(dataset, run, tracker=["mlflow"], epochs=2), stop_after_epoch=lambda e: e == 1)
    run_id = (run / "mlflow-run-id.txt").read_text().strip()
    train(options(dataset, run, tracker=["mlflow"], epochs=2, resume="auto"))
    assert (run / "mlflow-run-id.txt").read_text().strip() == run_id  # the same run

    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    for figure in ("val_recall_at_1", "val_recall_at_5", "val_map_at_r"):
        history = client.get_metric_history(run_id, figure)
        assert [(m.step, m.value) for m in history] == [
            (r["epoch"], pytest.approx(r[figure])) for r in metrics(run)]
    assert len(client.get_metric_history(run_id, "lr")) == metrics(run)[-1]["step"]
    logged = client.get_run(run_id)
    assert logged.data.params["target_batch"] == "8" and logged.info.status == "FINISHED"
    artefacts = {item.path for item in client.list_artifacts(run_id)}
    assert {"training.png", "metrics.jsonl", "config.yaml", "best.pt"} <= artefacts


def test_a_missing_extra_is_one_line_naming_it(dataset, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r'pip install "ascension-cli\[mlflow\]"'):
        train(options(dataset, tmp_path / "run", tracker=["mlflow"]))
    assert not (tmp_path / "run").exists()  # refused before any work
    result = runner.invoke(app, ["train", str(dataset), "--tracker", "mlflow", "--save-dir",
                                 str(tmp_path / "run"), "--no-pretrained"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'error: --tracker mlflow needs mlflow, which is not installed: pip install '
        '"ascension-cli[mlflow]"']


def test_a_bad_tracker_name_is_refused():
    result = runner.invoke(app, ["train", ".", "--tracker", "wandb"])
    assert result.exit_code == 2 and "invalid --tracker" in result.output
