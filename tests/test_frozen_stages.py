"""--frozen-stages: the stem and the first stages keep their starting weights and statistics."""

from __future__ import annotations

import pytest
import timm
import torch
from pydantic import ValidationError

from ascension_cli.config import TrainConfig
from ascension_cli.errors import CheckpointError
from ascension_cli.formats import LAST_CHECKPOINT
from ascension_cli.model.checkpoint import load_model
from ascension_cli.model.stages import freeze_stages, stages
from ascension_cli.train.loop import train
from tests.test_train import Collect, config, train_error


@pytest.fixture
def start_weights(tmp_path):
    """Starting weights for test_efficientnet, as a user's --weights file."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    path = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return path, backbone.state_dict()


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
