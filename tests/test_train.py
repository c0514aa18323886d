"""End-to-end trainer runs on a generated dataset with a tiny timm model at 32 px (CPU)."""

import json

import pytest
import torch
import yaml
from pydantic import ValidationError

from ascension_cli.config import TrainConfig, option_name
from ascension_cli.errors import CheckpointError, TrainingError
from ascension_cli.runtime import resolve_workers
from ascension_cli.train import build
from ascension_cli.train.logbook import figures_of
from ascension_cli.train.loop import Reporter, train


class Collect(Reporter):
    def __init__(self):
        self.messages: list[str] = []
        self.steps = 0
        self.tables: dict[str, dict[str, str]] = {}

    def message(self, text):
        self.messages.append(text)

    def table(self, title, rows):
        self.tables[title.split()[0]] = dict(rows)

    def step(self, loss, lr, images_per_second):
        self.steps += 1


def config(data, save_dir, **overrides) -> TrainConfig:
    options = dict(
        data_root=data, save_dir=save_dir, model="test_convnext", pretrained=False,
        image_size=32, batch_size=4, target_batch=8, samples_per_class=2, epochs=2,
        warmup_epochs=1, lr=1e-3, workers=0, val_fraction=0.25, seed=0,
    )
    options.update(overrides)
    if "val_root" in overrides:
        del options["val_fraction"]
    return TrainConfig(**options)


def train_error(dataset, save_dir, *arguments) -> str:
    """The one error line of ``ascension train`` on the tiny set with these options (exit 2,
    no traceback, one ``error:``)."""
    from typer.testing import CliRunner

    from ascension_cli.cli.app import app

    result = CliRunner().invoke(app, [
        "train", str(dataset), "--model", "test_convnext", "--no-pretrained", "--image-size",
        "32", "--batch-size", "4", "--target-batch", "8", "--samples-per-class", "2",
        "--epochs", "1", "--workers", "0", "--save-dir", str(save_dir), *arguments])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    last = result.output.strip().splitlines()[-1]  # after the tables a started run prints
    assert last.startswith("error: "), result.output
    return last


def test_training_writes_checkpoints_metrics_plot_and_config(dataset, tmp_path):
    reporter = Collect()
    result = train(config(dataset, tmp_path / "run"), reporter)
    run = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.jsonl", "training.png", "config.yaml"):
        assert (run / name).is_file(), name

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[0]["loss"] is None and records[0]["val_recall_at_1"] is not None
    for record in records[1:]:
        assert record["loss"] > 0 and 0 <= record["val_recall_at_1"] <= 1
        assert record["val_recall_at_1"] <= record["val_recall_at_5"] <= 1
        assert 0 <= record["val_map_at_r"] <= 1
        assert record["images_per_second"] > 0 and record["seconds"] > 0
        assert set(record) >= {"epoch", "step", "loss", "lr", "val_recall_at_1",
                               "images_per_second", "seconds"}
    untrained = records[0]["val_recall_at_1"]
    assert result.untrained_recall_at_1 == untrained
    for record in records[1:]:
        assert record["below_untrained"] == (record["val_recall_at_1"] <= untrained)
    # 24 training images / target batch 8 = 3 optimizer steps per epoch.
    assert records[-1]["step"] == 6 and reporter.steps == 6

    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 6
    assert checkpoint["classes"] == ["circle", "cross", "square", "triangle"]
    assert checkpoint["timm_name"] == "test_convnext"
    assert checkpoint["spec"]["image_size"] == 32
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "config", "pretrained_cfg"):
        assert key in checkpoint, key
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["image_size"] == 32 and resolved["resolved_device"] == "cpu"
    assert resolved["channels_last"] is True and resolved["workers"] == 0
    assert reporter.tables["dataset"]["train / val"] == "24 / 8"
    assert len(result.history) == 3


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(dataset, tmp_path):
    train(config(dataset, tmp_path / "whole", epochs=3))

    interrupted = config(dataset, tmp_path / "parts", epochs=3)
    first = train(interrupted, stop_after_epoch=lambda epoch: epoch == 1)
    assert first.stopped_early
    # Resume with another worker count: augmentation is seeded per sample, not per worker.
    reporter = Collect()
    train(config(dataset, tmp_path / "parts", epochs=3, resume="auto", workers=1), reporter)
    assert any("resumed from epoch 1" in m for m in reporter.messages)

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    assert whole["step"] == parts["step"]
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]


def test_corrupt_image_is_reported_and_skipped(dataset, tmp_path):
    (dataset / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (dataset / "square" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 nothing else")
    reporter = Collect()
    train(config(dataset, tmp_path / "run", val_fraction=0.0, epochs=3), reporter)
    skipped = [m for m in reporter.messages if m.startswith("skipped unreadable image")]
    # Reported once each, even though later epochs would draw them again.
    assert len(skipped) == len(set(skipped)) == 2
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert len(checkpoint["excluded"]) == 2


def test_refuses_to_overwrite_an_existing_run(dataset, tmp_path):
    train(config(dataset, tmp_path / "run", epochs=1))
    with pytest.raises(CheckpointError, match="pass resume auto") as refused:
        train(config(dataset, tmp_path / "run", epochs=1))
    # The library names the option by field; the command line spells it as its flag.
    assert "pass --resume auto" in refused.value.render(option_name)


def test_resume_with_other_model_options_is_refused(dataset, tmp_path):
    train(config(dataset, tmp_path / "run", epochs=1, head="mlp"))
    with pytest.raises(CheckpointError, match="embedding_dim"):
        train(config(dataset, tmp_path / "run", epochs=2, resume="auto", head="mlp",
                     embedding_dim=32))


def test_resume_may_switch_the_memory_layout_and_workers_resolve_by_device(dataset, tmp_path):
    train(config(dataset, tmp_path / "run", epochs=1, channels_last=False, workers=None))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["channels_last"] is False
    assert saved["workers"] == resolve_workers(None, torch.device("cpu"))
    reporter = Collect()
    train(config(dataset, tmp_path / "run", epochs=2, resume="auto"), reporter)
    assert any("resumed from epoch 1" in m for m in reporter.messages) and reporter.steps == 3


def test_resume_of_a_finished_run_does_nothing(dataset, tmp_path):
    train(config(dataset, tmp_path / "run", epochs=1))
    reporter = Collect()
    train(config(dataset, tmp_path / "run", epochs=1, resume="auto"), reporter)
    assert reporter.steps == 0
    assert any("already finished" in m for m in reporter.messages)


def test_resume_from_missing_path_is_an_error(dataset, tmp_path):
    # Refused with the options, before any work (the CLI prints it as one line).
    with pytest.raises(ValidationError, match="(?s)resume.*file not found"):
        train(config(dataset, tmp_path / "run", resume=str(tmp_path / "nope.pt")))


def test_non_finite_losses_skip_steps_then_abort(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(
        build, "supcon_loss", lambda e, labels, temperature: e.sum() * float("nan")
    )
    with pytest.raises(TrainingError, match="not finite for 2 steps in a row"):
        train(config(dataset, tmp_path / "run", max_nonfinite=2))


def test_isolated_non_finite_loss_is_skipped_and_counted(dataset, tmp_path, monkeypatch):
    real = build.supcon_loss
    calls = {"n": 0}

    def sometimes_nan(embeddings, labels, temperature):
        calls["n"] += 1
        loss = real(embeddings, labels, temperature)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(build, "supcon_loss", sometimes_nan)
    result = train(config(dataset, tmp_path / "run", epochs=1))
    assert result.history[-1].nonfinite_steps == 1
    assert all(torch.isfinite(t).all() for t in
               torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"].values())


def test_naive_accumulation_and_max_steps(dataset, tmp_path):
    result = train(config(dataset, tmp_path / "run", accumulation="naive", max_steps=2,
                          epochs=5, precision="fp32"))
    assert result.history[-1].step == 2
    assert result.stopped_early


def test_validation_tree_and_more_views(dataset, tmp_path):
    from tests.conftest import make_dataset

    val_root = make_dataset(tmp_path / "val", per_class=3, seed=9)
    result = train(config(dataset, tmp_path / "run", val_root=val_root, views=3, epochs=1))
    assert result.history[-1].val_recall_at_1 is not None


def test_an_instance_weight_trains_with_the_instance_term(dataset, tmp_path, monkeypatch):
    weights = []

    def spy(embeddings, labels, temperature, instance_weight):
        weights.append((embeddings.shape[1], instance_weight))
        return real(embeddings, labels, temperature, instance_weight)

    real = build.supcon_with_instances
    monkeypatch.setattr(build, "supcon_with_instances", spy)
    result = train(config(dataset, tmp_path / "run", views=2, instance_weight=0.25, epochs=1,
                          proxy_weight=0.0))
    assert weights and set(weights) == {(2, 0.25)}
    assert result.history[-1].loss is not None


def test_a_single_class_is_refused_with_a_clear_error(tmp_path):
    from ascension_cli.errors import DataError

    data = make_dataset_of(tmp_path, classes=1)
    with pytest.raises(DataError, match="at least two classes"):
        train(config(data, tmp_path / "run"))


def test_one_image_classes_still_train(tmp_path):
    data = make_dataset_of(tmp_path, classes=4, per_class=6)
    for index in range(1, 6):
        (data / "circle" / f"{index:03d}.png").unlink()  # circle keeps one image
    result = train(config(data, tmp_path / "run", epochs=1))
    assert result.history[-1].loss is not None


def make_dataset_of(tmp_path, **options):
    from tests.conftest import make_dataset

    return make_dataset(tmp_path / "data", **options)


@pytest.mark.parametrize("workers", [0, 1])
def test_cached_training_ends_with_the_weights_of_an_uncached_run(dataset, tmp_path, workers):
    # The 32 px images are within twice the input size: the cache holds the very same pixels.
    train(config(dataset, tmp_path / "plain", epochs=2))
    reporter = Collect()
    train(config(dataset, tmp_path / "cached", epochs=2, cache_images=True, workers=workers),
          reporter)
    assert any(m.startswith("cache_images: 32 images decoded once") for m in reporter.messages)
    plain = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)
    cached = torch.load(tmp_path / "cached" / "last.pt", weights_only=True)
    for name, tensor in plain["model"].items():
        assert torch.equal(tensor, cached["model"][name]), name
    assert plain["history"][-1]["val_recall_at_1"] == cached["history"][-1]["val_recall_at_1"]


def test_resume_may_not_switch_the_cache(dataset, tmp_path):
    train(config(dataset, tmp_path / "run", epochs=1, cache_images=True))
    with pytest.raises(CheckpointError, match="cache_images"):
        train(config(dataset, tmp_path / "run", epochs=2, resume="auto"))


def test_options_newer_than_the_checkpoint_compare_as_their_defaults(dataset, tmp_path):
    train(config(dataset, tmp_path / "run", epochs=1))
    path = tmp_path / "run" / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["config"]["cache_images"]  # as written before the option existed
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="cache_images: False -> True"):
        train(config(dataset, tmp_path / "run", epochs=2, resume="auto", cache_images=True))
    reporter = Collect()
    train(config(dataset, tmp_path / "run", epochs=2, resume="auto"), reporter)
    assert any("resumed from epoch 1" in m for m in reporter.messages)


def test_compiled_training_follows_the_eager_run(dataset, tmp_path):
    options = dict(epochs=1, max_steps=2, precision="fp32", val_fraction=0.0)
    train(config(dataset, tmp_path / "eager", **options))
    reporter = Collect()
    train(config(dataset, tmp_path / "compiled", compile=True, **options), reporter)
    assert any(m.startswith("compile:") for m in reporter.messages)
    eager = torch.load(tmp_path / "eager" / "last.pt", weights_only=True)
    compiled = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert compiled["model"].keys() == eager["model"].keys()  # the plain module is saved
    assert compiled["history"][-1]["loss"] == pytest.approx(eager["history"][-1]["loss"],
                                                            rel=1e-4)


def test_a_failing_compiler_ends_in_one_line(dataset, tmp_path, monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    class Broken(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            raise TorchDynamoException("no working C++ compiler\nlong details")

    monkeypatch.setattr(build, "compile_model", Broken)
    with pytest.raises(TrainingError, match=r"^compile failed: no working C\+\+ compiler; "
                                            r"train without compile$"):
        train(config(dataset, tmp_path / "run", epochs=1, compile=True))


def test_ctrl_c_while_caching_stops_before_training(dataset, tmp_path):
    import os
    import signal

    from ascension_cli.errors import Interrupted

    class CtrlC(Collect):
        def work_advance(self, count):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="while decoding images for cache_images") as caught:
        train(config(dataset, tmp_path / "run", cache_images=True), CtrlC())
    assert caught.value.exit_code == 128 + signal.SIGINT
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_default_target_batch_past_the_data_is_reduced_with_the_reason(dataset, tmp_path):
    options = dict(data_root=dataset, save_dir=tmp_path / "run", model="test_convnext",
                   pretrained=False, image_size=32, batch_size=4, epochs=1, workers=0,
                   val_fraction=0.25)  # --target-batch left at its default, 128
    reporter = Collect()
    train(TrainConfig(**options), reporter)
    assert any("holds 24 images, fewer than target_batch 128" in message
               and "using target_batch 24" in message for message in reporter.messages)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["target_batch"] == 24 and saved["batch_size"] == 4
    # The same options resume: the fitted batch is the checkpoint's.
    result = train(TrainConfig(**{**options, "epochs": 2, "resume": "auto"}))
    assert [record.epoch for record in result.history] == [0, 1, 2]


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_frozen_batchnorm_keeps_its_statistics_while_its_weights_train(dataset, tmp_path,
                                                                       freeze_bn):
    from ascension_cli.formats import LAST_CHECKPOINT
    from ascension_cli.model.checkpoint import load_model

    train(config(dataset, tmp_path / "run", model="test_efficientnet", epochs=1,
                 freeze_bn=freeze_bn, precision="fp32"))
    model, _, _ = load_model(tmp_path / "run" / LAST_CHECKPOINT)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    # A new layer's statistics are 0 and 1: a step in train mode moves them, a frozen one not.
    unmoved = all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
                  and torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    assert unmoved == freeze_bn
    assert any(not torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


def test_flip_average_is_recorded_for_the_searches_after_training_not_validation(dataset,
                                                                               tmp_path):
    from ascension_cli.formats import LAST_CHECKPOINT
    from ascension_cli.model.checkpoint import load_model, load_model_file, save_model_file

    flipped = train(config(dataset, tmp_path / "run", epochs=1, flip_average=True))
    plain = train(config(dataset, tmp_path / "plain", epochs=1))
    # Training, validation and so the choice of best.pt are those of a run without it.
    assert [figures_of(r) for r in flipped.history] == [figures_of(r) for r in plain.history]
    assert [r.loss for r in flipped.history] == [r.loss for r in plain.history]
    model, spec, _ = load_model(tmp_path / "run" / LAST_CHECKPOINT)
    assert spec.flip_average and model.flip_average
    save_model_file(tmp_path / "model.pt", model, spec)  # as a catalogue keeps it
    assert load_model_file(tmp_path / "model.pt").flip_average
    with pytest.raises(CheckpointError, match="flip_average: True -> False"):
        train(config(dataset, tmp_path / "run", epochs=2, resume="auto"))
