"""The weight average (`--ema-decay`): the average against a hand-written running loop, the
model holding it only inside `applied`, a run saving it as the checkpoint's model and resuming
both it and the trained weights exactly, and its default following the many-class rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ascension_cli.train.average import WeightAverage, kept_share
from ascension_cli.train.loop import train
from tests.test_train import config


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def sgd_steps(model: nn.Module, average: WeightAverage | None, steps: int) -> list[dict]:
    """``steps`` SGD steps on random data; the model's weights after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(steps):
        optimizer.zero_grad()
        inputs = torch.randn(8, 3, generator=generator)
        (model(inputs) - inputs[:, :2]).square().mean().backward()
        optimizer.step()
        if average is not None:
            average.update()
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return seen


def test_the_average_matches_a_running_loop_over_the_steps():
    model = small_model()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.8)
    seen = sgd_steps(model, average, 30)
    for key, value in start.items():
        if not value.is_floating_point():
            assert torch.equal(average.average[key], seen[-1][key])  # the step counter follows
            continue
        expected = value.double()
        for n, weights in enumerate(seen, start=1):
            keep = min(0.8, (1 + n) / (10 + n))
            expected = keep * expected + (1 - keep) * weights[key].double()
        assert torch.allclose(average.average[key].double(), expected, atol=1e-6), key
    assert kept_share(0.8, 1) == pytest.approx(2 / 11) and kept_share(0.8, 1000) == 0.8
    assert not torch.allclose(average.average["0.weight"], seen[-1]["0.weight"])


def test_the_model_holds_the_average_only_inside_applied():
    model = small_model()
    average = WeightAverage(model, decay=0.5)
    trained = sgd_steps(model, average, 5)[-1]
    outside = average.state_dict()  # the same state, with the average applied or not
    with average.applied():
        with average.applied():  # nested: still the average, restored once at the end
            assert torch.equal(model.state_dict()["0.weight"], average.average["0.weight"])
        assert torch.equal(model.state_dict()["0.weight"], average.average["0.weight"])
        saved = average.state_dict()
    assert torch.equal(model.state_dict()["0.weight"], trained["0.weight"])
    assert torch.equal(saved["trained"]["0.weight"], trained["0.weight"]) and saved["steps"] == 5
    assert torch.equal(outside["trained"]["0.weight"], trained["0.weight"])
    assert outside["steps"] == 5
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(model, decay=1.0)


def test_a_run_saves_the_average_as_its_model_and_resumes_exactly(dataset, tmp_path):
    train(config(dataset, tmp_path / "whole", epochs=3, ema_decay=0.5))
    train(config(dataset, tmp_path / "parts", epochs=3, ema_decay=0.5),
          stop_after_epoch=lambda epoch: epoch == 1)
    train(config(dataset, tmp_path / "parts", epochs=3, ema_decay=0.5, resume="auto"))

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    assert whole["average"]["steps"] == parts["average"]["steps"] == whole["step"]
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name
        assert torch.equal(whole["average"]["trained"][name], parts["average"]["trained"][name])
    # The model saved is the average, not the trained weights it followed.
    assert any(not torch.equal(tensor, whole["average"]["trained"][name])
               for name, tensor in whole["model"].items() if tensor.is_floating_point())


def test_a_checkpoint_whose_average_was_removed_is_refused_in_one_line(dataset, tmp_path):
    from ascension_cli.errors import CheckpointError

    train(config(dataset, tmp_path / "run", epochs=2, ema_decay=0.5),
          stop_after_epoch=lambda epoch: epoch == 1)
    last = tmp_path / "run" / "last.pt"
    for damage in ({"average": None}, {"average": {"steps": 3}}):
        payload = torch.load(last, weights_only=True)
        torch.save({**payload, **damage}, tmp_path / "damaged.pt")
        with pytest.raises(CheckpointError, match=r"damaged\.pt: its 'average' state is missing"):
            train(config(dataset, tmp_path / "run", epochs=2, ema_decay=0.5,
                         resume=str(tmp_path / "damaged.pt")))
    torch.save({**torch.load(last, weights_only=True), "average": None}, last)
    with pytest.raises(CheckpointError, match=r"run.last\.pt: its 'average' state is missing"):
        train(config(dataset, tmp_path / "run", epochs=2, ema_decay=0.5, resume="auto"))


def test_without_an_average_a_checkpoint_holds_the_trained_weights(dataset, tmp_path):
    train(config(dataset, tmp_path / "run", epochs=1, ema_decay=0))
    assert "average" not in torch.load(tmp_path / "run" / "last.pt", weights_only=True)


def test_the_default_averages_only_where_a_batch_cannot_hold_every_class():
    from ascension_cli.config import TrainConfig

    assert TrainConfig(data_root=".").ema_decay is None
    from tests.conftest import planned

    assert planned(TrainConfig(data_root="."), 81).ema_decay == 0.9
    assert planned(TrainConfig(data_root="."), 32).ema_decay == 0.0
    assert planned(TrainConfig(data_root=".", ema_decay=0.99), 32).ema_decay == 0.99
    with pytest.raises(ValueError):
        TrainConfig(data_root=".", ema_decay=1.0)
