"""--frozen-stages: the stem and the first stages keep their starting weights and statistics."""

from __future__ import annotations

import pytest
import timm
import torch
import yaml
from pydantic import ValidationError

from ascension_cli.config import TrainConfig
from ascension_cli.config.fields import AUTO_FROZEN_OF, AUTO_FROZEN_STAGES
from ascension_cli.errors import CheckpointError
from ascension_cli.formats import LAST_CHECKPOINT, RUN_CONFIG
from ascension_cli.model.checkpoint import load_model
from ascension_cli.model.stages import freeze_stages, stages
from ascension_cli.train import plan
from ascension_cli.train.loop import train
from ascension_cli.train.plan import planned_frozen_stages, recorded_frozen_stages
from tests.test_train import Collect, config, train_error


def kept_as_started(run, start, count):
    """Assert that last.pt's stem and first ``count`` stages (weights and BatchNorm statistics)
    are exactly ``start``'s; returns its backbone's tensors and stages."""
    model, _, _ = load_model(run / LAST_CHECKPOINT)
    trained = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    groups = stages(model.backbone)
    layers = {n.rsplit(".", 1)[0] for group in groups[:count + 1] for n in group}
    for key, value in trained.items():
        if key.rsplit(".", 1)[0] in layers:
            assert torch.equal(value, start[key]), key
    return trained, groups


@pytest.mark.parametrize("name, count", [("test_efficientnet", 5), ("test_resnet", 4),
                                         ("test_vit", 6)])
def test_a_backbones_stages_are_its_stem_then_timms_coarse_groups(name, count):
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    groups = stages(backbone)
    assert len(groups) - 1 == count
    # Every parameter is in one stage, in the order the image flows through them.
    names = [n for n, _ in backbone.named_parameters()]
    assert sorted(n for group in groups for n in group) == sorted(names)
    assert all(not n.startswith(("blocks.", "layer")) for n in groups[0])


def test_the_frozen_stages_end_where_they_started_and_the_rest_trains(dataset, tmp_path,
                                                                        start_weights):
    path, start = start_weights
    reporter = Collect()
    train(config(dataset, tmp_path / "run", model="test_efficientnet", pretrained=True,
                 weights=path, frozen_stages=2, epochs=1, precision="fp32"), reporter)
    assert any("the stem and the first 2 stages keep their starting weights" in m
               for m in reporter.messages)
    trained, groups = kept_as_started(tmp_path / "run", start, 2)
    moved = [n for group in groups[3:] for n in group if not torch.equal(trained[n], start[n])]
    assert moved, "the stages after the frozen ones did not train"


def test_freezing_keeps_the_parameters_out_of_the_gradient():
    model = torch.nn.Module()
    model.backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    kept = freeze_stages(model, 1)
    first = stages(model.backbone)[:2]
    assert kept == sum(p.numel() for n, p in model.backbone.named_parameters()
                       if n in {x for group in first for x in group})
    model.backbone(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, parameter in model.backbone.named_parameters():
        frozen = any(name in group for group in first)
        assert (parameter.grad is None) == frozen, name


def test_too_many_stages_is_one_line_naming_what_the_model_has(dataset, tmp_path,
                                                               start_weights):
    message = train_error(dataset, tmp_path / "run", "--model", "test_efficientnet",
                          "--weights", str(start_weights[0]), "--frozen-stages", "5")
    assert "--frozen-stages 5 with test_efficientnet" in message
    assert "5 stages after its stem and one must train: give 0 to 4" in message


def test_a_run_from_scratch_has_nothing_to_keep(dataset, tmp_path):
    with pytest.raises(ValidationError, match="--frozen-stages keeps starting weights"):
        TrainConfig(data_root=dataset, save_dir=tmp_path, pretrained=False, frozen_stages=1)


def test_a_resume_keeps_the_stages_frozen_and_refuses_another_count(dataset, tmp_path,
                                                                     start_weights):
    path, start = start_weights
    options = dict(model="test_efficientnet", pretrained=True, weights=path, frozen_stages=1,
                   precision="fp32")
    train(config(dataset, tmp_path / "run", epochs=1, **options))
    with pytest.raises(CheckpointError, match=r"frozen_stages: 1 -> 2"):
        train(config(dataset, tmp_path / "run", epochs=2, resume="auto",
                     **{**options, "frozen_stages": 2}))
    train(config(dataset, tmp_path / "run", epochs=2, resume="auto", **options))
    kept_as_started(tmp_path / "run", start, 1)


@pytest.fixture
def efficientnet_rule(monkeypatch):
    """The default's rule as it would hold if test_efficientnet (5 stages after its stem) had
    an EfficientNet's stage count."""
    monkeypatch.setattr(plan, "AUTO_FROZEN_OF", 5)
    return plan.AUTO_FROZEN_STAGES


def test_by_default_a_backbone_with_weights_keeps_its_first_stages(dataset, tmp_path,
                                                                     start_weights,
                                                                     efficientnet_rule):
    path, start = start_weights
    train(config(dataset, tmp_path / "run", model="test_efficientnet", pretrained=True,
                 weights=path, epochs=1, precision="fp32"))
    kept_as_started(tmp_path / "run", start, efficientnet_rule)
    saved = yaml.safe_load((tmp_path / "run" / RUN_CONFIG).read_text())
    assert saved["frozen_stages"] is None
    assert saved["resolved_frozen_stages"] == efficientnet_rule
    assert saved["plan"]["reasons"]["frozen_stages"].startswith("default: the stem and the first")


def test_the_default_keeps_nothing_from_scratch_or_where_it_was_not_measured(dataset,
                                                                            tmp_path):
    options = dict(data_root=dataset, save_dir=tmp_path, model="tf_efficientnet_lite0")
    scratch = TrainConfig(**options, pretrained=False)
    weights = TrainConfig(**options, pretrained=True)
    assert planned_frozen_stages(scratch, AUTO_FROZEN_OF, None)[0] == 0
    assert planned_frozen_stages(weights, AUTO_FROZEN_OF, None)[0] == AUTO_FROZEN_STAGES
    count, why = planned_frozen_stages(weights, 4, None)
    assert count == 0 and "tf_efficientnet_lite0 has 4" in why
    assert planned_frozen_stages(weights, None, None) == (
        0, f"default: kept only on a backbone with {AUTO_FROZEN_OF} stages after its stem (an "
        "EfficientNet's); tf_efficientnet_lite0 does not name its stages")
    given = TrainConfig(**options, pretrained=True, frozen_stages=1)
    assert planned_frozen_stages(given, AUTO_FROZEN_OF, None) == (1, "given")


@pytest.mark.parametrize("checkpoint, count", [
    ({"config": {"frozen_stages": None}, "plan": {"frozen_stages": 2}}, 2),
    ({"config": {"frozen_stages": 1}}, 1),  # given, before the plan held the count
    ({"config": {}}, 0),  # before --frozen-stages: every layer trained
    ({"config": {}, "plan": {"temperature": 0.1}}, 0)])
def test_a_checkpoint_says_the_stages_it_kept(checkpoint, count):
    assert recorded_frozen_stages(checkpoint) == count


@pytest.mark.parametrize("bad", [-1, "3", 2.0, True])
def test_a_recorded_count_that_is_not_one_is_refused(bad):
    with pytest.raises(ValueError, match="the stages kept must be a count"):
        recorded_frozen_stages({"config": {}, "plan": {"frozen_stages": bad}})


def test_a_checkpoint_from_before_the_default_resumes_with_every_stage_training(
        dataset, tmp_path, start_weights, monkeypatch):
    path, _ = start_weights
    options = dict(model="test_efficientnet", pretrained=True, weights=path, precision="fp32")
    train(config(dataset, tmp_path / "run", epochs=1, **options))
    last = tmp_path / "run" / LAST_CHECKPOINT
    checkpoint = torch.load(last, weights_only=True)
    # As a run before --frozen-stages saved it: no count in its options or its plan.
    del checkpoint["config"]["frozen_stages"], checkpoint["plan"]["frozen_stages"]
    torch.save(checkpoint, last)
    # The default as it would now be for this backbone: its first stages kept.
    monkeypatch.setattr(plan, "AUTO_FROZEN_OF", 5)
    with pytest.raises(CheckpointError, match=r"frozen_stages: 0 -> 3"):
        train(config(dataset, tmp_path / "run", epochs=2, resume="auto", frozen_stages=3,
                     **options))
    before = torch.load(last, weights_only=True)["model"]
    train(config(dataset, tmp_path / "run", epochs=2, resume="auto", **options))
    saved = yaml.safe_load((tmp_path / "run" / RUN_CONFIG).read_text())
    assert saved["resolved_frozen_stages"] == 0
    assert saved["plan"]["reasons"]["frozen_stages"] == "the resumed run's"
    after = torch.load(last, weights_only=True)["model"]
    stem = [key for key in after if key.startswith("backbone.conv_stem")]
    assert stem and any(not torch.equal(before[key], after[key]) for key in stem)
