"""The learning-rate recipe: scaling with the target batch, warmup length, the schedule after
it, parameter groups."""

import math

import pytest
import timm
import torch

from ascension_cli.config import COSINE_FLOOR, LR_REFERENCE_BATCH, WARMUP_SHARE
from ascension_cli.model.backbone import EmbeddingModel
from ascension_cli.train.schedule import (
    adamw,
    scaled_lr,
    warmup_cosine,
    warmup_steps,
    warmup_then,
)
from tests.test_train import config


def test_lr_follows_the_target_batch_by_the_chosen_rule():
    assert LR_REFERENCE_BATCH == 32
    assert scaled_lr(3e-4, 32, "linear") == pytest.approx(3e-4)
    assert scaled_lr(3e-4, 128, "linear") == pytest.approx(1.2e-3)
    assert scaled_lr(3e-4, 128, "sqrt") == pytest.approx(6e-4)
    assert scaled_lr(3e-4, 128, "none") == pytest.approx(3e-4)
    # Linear scaling keeps lr x optimizer steps per epoch the same whatever the target batch.
    assert scaled_lr(1e-3, 256, "linear") / 256 == pytest.approx(scaled_lr(1e-3, 64, "linear") / 64)
    with pytest.raises(ValueError):
        scaled_lr(1e-3, 64, "cubic")


def test_warmup_is_a_share_of_the_run_unless_given_in_epochs():
    assert warmup_steps(None, steps_per_epoch=20, total_steps=100) == round(WARMUP_SHARE * 100)
    assert warmup_steps(None, steps_per_epoch=20, total_steps=1000) == round(WARMUP_SHARE * 1000)
    assert warmup_steps(2, steps_per_epoch=20, total_steps=100) == 40
    assert warmup_steps(0.5, steps_per_epoch=9, total_steps=90) == 4
    assert warmup_steps(0, steps_per_epoch=20, total_steps=100) == 0


def test_warmup_cosine_rises_then_decays_to_the_floor():
    factor = warmup_cosine(total_steps=100, warmup_steps=5, min_ratio=0.01)
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(5) == pytest.approx(1.0)
    assert factor(100) == pytest.approx(0.01)
    assert all(factor(s) >= factor(s + 1) for s in range(5, 100))
    assert math.isclose(warmup_cosine(10, 0)(0), 1.0)


def test_each_schedule_warms_up_alike_then_holds_or_decays():
    constant, cosine = (warmup_then(name, 100, 5) for name in ("constant", "cosine"))
    assert [constant(s) for s in range(5)] == [cosine(s) for s in range(5)]
    assert all(constant(s) == 1.0 for s in range(5, 101))
    assert cosine(100) == pytest.approx(COSINE_FLOOR)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        warmup_then("step", 100, 5)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_training_follows_the_chosen_schedule(dataset, tmp_path, schedule):
    from ascension_cli.train.loop import train

    run = config(dataset, tmp_path / "run", epochs=3, warmup_epochs=1, lr_schedule=schedule)
    lrs = [record.lr for record in train(run).history if record.epoch > 0]
    step_lr = scaled_lr(run.lr, run.target_batch, run.lr_scaling)
    if schedule == "constant":
        assert lrs == pytest.approx([step_lr] * 3)
    else:
        assert lrs[0] > lrs[1] > lrs[2] == pytest.approx(step_lr * COSINE_FLOOR)


def test_adamw_groups_split_backbone_from_head_and_decay_from_no_decay():
    torch.manual_seed(0)
    model = EmbeddingModel(timm.create_model("test_convnext", num_classes=0), 8, "mlp")
    optimizer = adamw(model, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.1)
    grouped = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    assert len(grouped) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, parameter in model.named_parameters():
        group = grouped[id(parameter)]
        expected_lr = 1e-4 if name.startswith("backbone.") else 1e-3
        assert group["lr"] == pytest.approx(expected_lr), name
        assert group["weight_decay"] == (0.0 if parameter.ndim <= 1 else 0.05), name
    # The first group is the head's weights: the trainer reports its LR, the --lr it scaled.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_adamw_keeps_two_groups_when_the_backbone_shares_the_lr():
    # The layout of earlier versions, so their checkpoints' optimizer states still load.
    torch.manual_seed(0)
    model = EmbeddingModel(timm.create_model("test_convnext", num_classes=0), 8, "mlp")
    optimizer = adamw(model, lr=1e-3, weight_decay=0.05)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    assert all(group["lr"] == 1e-3 for group in optimizer.param_groups)


def test_no_head_trains_the_features_retrieval_uses():
    torch.manual_seed(0)
    model = EmbeddingModel(timm.create_model("test_convnext", num_classes=0), 8, "none").eval()
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(images), model.features(images))
    assert not list(model.head.parameters())
