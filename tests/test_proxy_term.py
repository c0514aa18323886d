"""The Proxy-Anchor term beside SupCon (`--proxy-weight`): the loss against a per-proxy loop
and against pytorch-metric-learning's, the cached step against the true full batch (proxies
included), training keeps the proxies at their own LR, and the bad combinations are one line."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ascension_cli.losses import (
    SupConWithProxies,
    proxy_anchor_loss,
    supcon_loss,
    supcon_with_instances,
)
from ascension_cli.train.gradcache import cached_backward
from ascension_cli.train.loop import train
from tests.test_gradcache import gradients, make_batch, make_model, relative_error, split
from tests.test_train import config, train_error


def per_proxy_loop(embeddings, labels, proxies, margin=0.1, alpha=32.0) -> float:
    """The paper's formula, one proxy at a time, in float64."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    p = torch.nn.functional.normalize(proxies.double(), dim=-1)
    pulls, pushes = [], []
    for c in range(len(p)):
        own = [float(x[i] @ p[c]) for i in range(len(x)) if labels[i] == c]
        other = [float(x[i] @ p[c]) for i in range(len(x)) if labels[i] != c]
        if own:
            pulls.append(math.log(1 + sum(math.exp(-alpha * (s - margin)) for s in own)))
        pushes.append(math.log(1 + sum(math.exp(alpha * (s + margin)) for s in other)))
    return sum(pulls) / len(pulls) + sum(pushes) / len(pushes)


def test_proxy_anchor_matches_the_per_proxy_loop():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(12, 8, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 0, 0])
    proxies = torch.randn(5, 8, generator=generator)  # classes 3 and 4 absent: push terms only
    found = float(proxy_anchor_loss(embeddings, labels, proxies))
    assert found == pytest.approx(per_proxy_loop(embeddings, labels, proxies), rel=1e-5)
    # Stable where the literal exp() would overflow float32: alpha 100 on aligned vectors.
    aligned = proxy_anchor_loss(proxies[labels % 5], labels % 5, proxies, alpha=100.0)
    assert torch.isfinite(aligned)


def test_proxy_anchor_matches_pytorch_metric_learning():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    theirs = losses.ProxyAnchorLoss(num_classes=4, embedding_size=8, margin=0.1, alpha=32)
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(16, 8, generator=generator)
    labels = torch.arange(16) % 3  # class 3 has no photo in the batch
    mine = proxy_anchor_loss(embeddings, labels, theirs.proxies.detach())
    assert float(mine) == pytest.approx(float(theirs(embeddings, labels).detach()), rel=1e-5)


def test_supcon_with_proxies_adds_the_weighted_term():
    loss = SupConWithProxies(4, 16, temperature=0.1, weight=0.5,
                             generator=torch.Generator().manual_seed(0))
    embeddings = torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expected = (supcon_loss(embeddings, labels, 0.1) + 0.5 * proxy_anchor_loss(
        embeddings.reshape(16, 16), labels.repeat_interleave(2), loss.proxies))
    found = loss(embeddings, labels).detach()
    assert float(found) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert loss.proxies.std().item() == pytest.approx((2 / 4) ** 0.5, rel=0.3)


def test_supcon_with_proxies_keeps_the_instance_term():
    loss = SupConWithProxies(4, 16, 0.1, 0.5, torch.Generator().manual_seed(0),
                             instance_weight=0.2)
    embeddings = torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expected = (supcon_with_instances(embeddings, labels, 0.1, 0.2) + 0.5 * proxy_anchor_loss(
        embeddings.reshape(16, 16), labels.repeat_interleave(2), loss.proxies))
    assert float(loss(embeddings, labels).detach()) == pytest.approx(float(expected.detach()),
                                                                      rel=1e-6)


def test_the_cached_step_equals_the_true_full_batch_proxies_included():
    model = make_model()
    loss = SupConWithProxies(4, 16, 0.1, 1.0, torch.Generator().manual_seed(0))
    reference, reference_loss = copy.deepcopy(model), copy.deepcopy(loss)
    batch, labels = make_batch()
    cached = cached_backward(model, split(batch, labels, 4), loss)
    embeddings = reference(batch.flatten(0, 1)).view(len(batch), batch.shape[1], -1)
    full = reference_loss(embeddings, labels)
    full.backward()
    assert float(cached) == pytest.approx(float(full.detach()), rel=1e-5)
    assert relative_error(gradients(model), gradients(reference)) < 1e-4
    assert relative_error(loss.proxies.grad, reference_loss.proxies.grad) < 1e-4


def test_training_keeps_the_proxies_at_their_own_lr(dataset, tmp_path):
    train(config(dataset, tmp_path / "run", proxy_weight=0.5, loss_lr_scale=10, epochs=1))
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["loss"]["proxies"].shape == (4, saved["spec"]["num_features"])
    groups = saved["optimizer"]["param_groups"]
    assert groups[-1]["initial_lr"] == pytest.approx(10 * groups[0]["initial_lr"])
    assert groups[-1]["weight_decay"] == 0.0


@pytest.mark.parametrize(("arguments", "message"), [
    (["--loss", "pml:ProxyAnchorLoss", "--proxy-weight", "0.5"], "a pml: loss brings its own"),
    (["--loss-lr-scale", "10", "--proxy-weight", "0"], "applies to a loss with proxies"),
    (["--proxy-weight", "-1"], "--proxy-weight"),
])
def test_bad_proxy_options_end_in_one_line(dataset, tmp_path, arguments, message):
    assert message in train_error(dataset, tmp_path / "run", *arguments)


def resolved(option: str, classes: int, **options) -> object:
    """What the plan resolves ``option`` to on ``classes`` classes (``train/plan.py``)."""
    from ascension_cli.config import TrainConfig
    from tests.conftest import planned

    return getattr(planned(TrainConfig(data_root=".", **options), classes), option)


def test_the_default_weight_adds_proxies_only_where_a_batch_cannot_hold_every_class():
    from ascension_cli.config import AUTO_PROXY_WEIGHT, TrainConfig

    # 128 images a step, 4 a class: 32 classes a batch
    assert TrainConfig(data_root=".").proxy_weight is None
    assert resolved("proxy_weight", 81) == AUTO_PROXY_WEIGHT
    assert resolved("proxy_weight", 32) == 0.0
    assert resolved("proxy_weight", 81, proxy_weight=0) == 0.0
    assert resolved("proxy_weight", 10, proxy_weight=2) == 2.0
    assert resolved("proxy_weight", 81, loss="pml:ContrastiveLoss") == 0.0


def test_the_temperature_is_one_default_on_every_set():
    from ascension_cli.config import TEMPERATURE, TrainConfig

    assert TrainConfig(data_root=".").temperature == TEMPERATURE == 0.1
    assert resolved("temperature", 81) == resolved("temperature", 32) == 0.1
    assert resolved("temperature", 81, temperature=0.2) == 0.2


def test_the_default_lr_stays_at_its_peak_only_where_a_batch_cannot_hold_every_class():
    from ascension_cli.config import TrainConfig

    assert TrainConfig(data_root=".").lr_schedule is None
    assert resolved("lr_schedule", 81) == "constant"
    assert resolved("lr_schedule", 32) == "cosine"
    assert resolved("lr_schedule", 81, loss="pml:ContrastiveLoss") == "cosine"
    assert resolved("lr_schedule", 10, lr_schedule="constant") == "constant"
    assert [resolved(name, 81) for name in ("proxy_weight", "temperature", "lr_schedule",
                                            "ema_decay")] == [0.3, 0.1, "constant", 0.9]


@pytest.mark.parametrize(("target_batch", "weight", "schedule"),
                         [(4, 0.3, "constant"), (8, 0.0, "cosine")])
def test_a_run_records_what_it_resolved(dataset, tmp_path, target_batch, weight, schedule):
    import yaml

    # Four classes, two photos each a batch: a batch of 4 holds two classes, one of 8 all four.
    train(config(dataset, tmp_path / "run", target_batch=target_batch, batch_size=4, epochs=1))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["proxy_weight"] is None and saved["resolved_proxy_weight"] == weight
    assert saved["temperature"] == 0.1 and "resolved_temperature" not in saved
    assert saved["lr_schedule"] is None and saved["resolved_lr_schedule"] == schedule
    assert saved["resolved_ema_decay"] == (0.9 if weight else 0.0)
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ("loss" in checkpoint) == bool(weight)
    # The plan, with why each setting took its value, in config.yaml and the checkpoint.
    assert checkpoint["plan"] == saved["plan"]
    assert checkpoint["plan"]["temperature"] == 0.1
    assert checkpoint["plan"]["reasons"]["temperature"] == "default"
    assert "target batch" in checkpoint["plan"]["reasons"]["lr_schedule"]


def resume(checkpoint: dict, current, classes: list[str]) -> None:
    """The two checks a resume makes of ``checkpoint`` against a run with ``current``'s options
    on ``classes`` (32 training images): its options, then its plan."""
    from ascension_cli.config import check_resumable
    from ascension_cli.train.plan import check_plan, planned_before
    from tests.conftest import planned

    check_resumable(checkpoint, current, classes)
    plan = planned(current, len(classes), 32)
    check_plan(planned_before(checkpoint, plan, 32), plan)


def test_a_run_from_before_the_defaults_resumes_only_as_it_trained(dataset, tmp_path):
    from ascension_cli.config import to_plain
    from ascension_cli.errors import CheckpointError

    def resume_before_plan(old: dict, current, classes: list[str]) -> None:
        resume({"config": old, "classes": classes}, current, classes)

    old = to_plain(config(dataset, tmp_path / "run", temperature=0.1))
    # From before them (and before the plan): SupCon alone, on a cosine, no weight average.
    del old["proxy_weight"], old["lr_schedule"], old["ema_decay"]
    # A batch of 8 (2 photos a class) holds 4 classes: on 4 the defaults resolve as it trained.
    few = [f"class{i}" for i in range(4)]
    resume_before_plan(old, config(dataset, tmp_path / "run"), few)
    many = [f"class{i}" for i in range(9)]
    with pytest.raises(CheckpointError,
                       match=r"proxy_weight: 0\.0 -> 0\.3; "
                             r"lr_schedule: 'cosine' -> 'constant'; ema_decay: 0\.0 -> 0\.9"):
        resume_before_plan(old, config(dataset, tmp_path / "run"), many)
    as_trained = config(dataset, tmp_path / "run", proxy_weight=0, lr_schedule="cosine",
                        ema_decay=0)
    resume_before_plan(old, as_trained, many)


def test_a_run_whose_temperature_followed_the_data_resumes_at_the_one_it_trained_at(
        dataset, tmp_path):
    """A checkpoint from while --temperature defaulted to 0.07 on many classes records None:
    with its plan, or (older) planned again by the old rule, it resumes only at that value."""
    from ascension_cli.config import to_plain
    from ascension_cli.errors import CheckpointError
    from tests.conftest import planned

    old = {**to_plain(config(dataset, tmp_path / "run")), "temperature": None}
    many, few = [f"class{i}" for i in range(9)], [f"class{i}" for i in range(4)]
    before_plan = {"config": old, "classes": many}
    with pytest.raises(CheckpointError, match=r"temperature: 0\.07 -> 0\.1\)"):
        resume(before_plan, config(dataset, tmp_path / "run"), many)
    resume(before_plan, config(dataset, tmp_path / "run", temperature=0.07), many)
    resume({"config": old, "classes": few}, config(dataset, tmp_path / "run"), few)
    as_trained = config(dataset, tmp_path / "run", temperature=0.07)
    with_plan = {**before_plan, "plan": planned(as_trained, len(many), 32).to_dict()}
    with pytest.raises(CheckpointError, match=r"temperature: 0\.07 -> 0\.1\)"):
        resume(with_plan, config(dataset, tmp_path / "run"), many)
    resume(with_plan, as_trained, many)


def test_the_proxies_start_at_their_classes_mean_features(dataset, tmp_path):
    """--proxy-start means: each proxy points where its class's photos are under the starting
    weights (its length the random start's, so a step at the proxies' LR moves it as before);
    the default keeps the random start."""
    import numpy as np
    from torch.utils.data import DataLoader

    from ascension_cli.data.augment import eval_transform
    from ascension_cli.data.dataset import EvalDataset, collate
    from ascension_cli.embedding.inference import extract_features
    from ascension_cli.train.build import build_run
    from ascension_cli.train.reporter import Reporter
    from ascension_cli.train.stopping import StopRequest

    said = []

    class Heard(Reporter):
        def message(self, text: str) -> None:
            said.append(text)

    run = build_run(config(dataset, tmp_path / "run", proxy_weight=0.5, proxy_start="means"),
                    Heard(), StopRequest())
    proxies = run.opt.loss_module.proxies.detach()
    data, spec = run.data, run.nets.spec
    paths = [data.scan.paths[row] for row in data.train_index]  # 6 a class: each one chosen
    photos = EvalDataset(paths, data.train_labels, eval_transform(
        spec.image_size, spec.mean, spec.std, spec.crop_pct))
    features, labels, _ = extract_features(run.nets.model, DataLoader(
        photos, batch_size=4, collate_fn=collate), torch.device("cpu"), "backbone",
        channels_last=False)
    random_start = SupConWithProxies(4, spec.num_features, 0.1, 0.5,
                                     torch.Generator().manual_seed(0)).proxies.detach()
    for label in range(4):
        mean = torch.from_numpy(features[labels == label].mean(axis=0))
        cosine = torch.nn.functional.cosine_similarity(mean, proxies[label], dim=0)
        assert float(cosine) > 0.999
        assert float(proxies[label].norm()) == pytest.approx(float(random_start[label].norm()),
                                                             rel=1e-5)
    assert any("proxies start at their classes' mean features (4 classes" in s for s in said)
    assert np.isfinite(features).all()
    default = build_run(config(dataset, tmp_path / "other", proxy_weight=0.5), Reporter(),
                        StopRequest())
    assert torch.equal(default.opt.loss_module.proxies.detach(), random_start)
