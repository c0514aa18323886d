"""The gradient-cached step against a true large batch (the point of the trainer issue)."""

import copy

import pytest
import timm
import torch
from torch import nn

from ascension_cli.losses import supcon_loss
from ascension_cli.model.backbone import EmbeddingModel
from ascension_cli.train.gradcache import accumulated_backward, cached_backward


def make_model(name: str = "test_convnext", **kwargs) -> EmbeddingModel:
    torch.manual_seed(0)
    return EmbeddingModel(timm.create_model(name, num_classes=0, **kwargs), 16, "mlp")


def make_batch(images: int = 16, views: int = 2, size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(images, views, 3, size, size, generator=generator)
    labels = torch.arange(images) // 4
    return batch, labels


def loss_fn(embeddings, labels):
    return supcon_loss(embeddings, labels, 0.1)


def gradients(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def split(batch, labels, micro: int):
    return [(batch[i : i + micro], labels[i : i + micro]) for i in range(0, len(batch), micro)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_cached_step_equals_true_full_batch():
    model = make_model()  # ConvNeXt: LayerNorm, no BatchNorm
    reference = copy.deepcopy(model)
    batch, labels = make_batch()

    cached_loss = cached_backward(model, split(batch, labels, 4), loss_fn)

    embeddings = reference(batch.flatten(0, 1)).view(16, 2, -1)
    full_loss = loss_fn(embeddings, labels)
    full_loss.backward()

    assert float(cached_loss) == pytest.approx(float(full_loss.detach()), rel=1e-5)
    assert relative_error(gradients(model), gradients(reference)) < 1e-4


def test_batchnorm_in_eval_mode_also_matches():
    model = make_model("test_efficientnet").eval()
    reference = copy.deepcopy(model)
    batch, labels = make_batch(seed=1)
    cached_backward(model, split(batch, labels, 8), loss_fn)
    loss_fn(reference(batch.flatten(0, 1)).view(16, 2, -1), labels).backward()
    assert relative_error(gradients(model), gradients(reference)) < 1e-4


def test_rng_is_replayed_so_drop_path_masks_match():
    # With stochastic depth the second pass must draw the same masks as the first: compare with
    # a graph kept through every micro-batch, drawn from the same starting RNG state.
    model = make_model(drop_path_rate=0.5, drop_rate=0.3)
    reference = copy.deepcopy(model)
    batch, labels = make_batch(seed=2)
    micro = split(batch, labels, 4)

    torch.manual_seed(123)
    cached_backward(model, micro, loss_fn)
    after_cached = torch.get_rng_state()

    torch.manual_seed(123)
    outputs = [reference(images.flatten(0, 1)) for images, _ in micro]
    loss_fn(torch.cat(outputs).view(16, 2, -1), labels).backward()

    assert relative_error(gradients(model), gradients(reference)) < 1e-4
    assert torch.equal(after_cached, torch.get_rng_state())


def test_without_replay_drop_path_would_differ():
    # Guards the test above: the masks really are random, so a mismatch would show.
    model = make_model(drop_path_rate=0.5)
    batch, _ = make_batch(images=4, seed=3)
    model.train()
    torch.manual_seed(1)
    first = model(batch.flatten(0, 1))
    second = model(batch.flatten(0, 1))
    assert not torch.allclose(first, second)


def test_batchnorm_running_stats_update_once_per_micro_batch():
    model = make_model("test_efficientnet").train()
    plain = copy.deepcopy(model)
    batch, labels = make_batch(seed=4)
    micro = split(batch, labels, 8)
    cached_backward(model, micro, loss_fn)
    with torch.no_grad():
        for images, _ in micro:
            plain(images.flatten(0, 1))
    for ours, theirs in zip(model.buffers(), plain.buffers(), strict=True):
        assert torch.allclose(ours.float(), theirs.float(), atol=1e-6)


def test_naive_accumulation_is_a_different_loss():
    model = make_model()
    naive = copy.deepcopy(model)
    batch, labels = make_batch(seed=5)
    cached_backward(model, split(batch, labels, 4), loss_fn)
    accumulated_backward(naive, split(batch, labels, 4), loss_fn)
    assert relative_error(gradients(naive), gradients(model)) > 1e-2


def test_naive_accumulation_of_one_micro_batch_is_the_plain_step():
    model = make_model()
    reference = copy.deepcopy(model)
    batch, labels = make_batch(images=8, seed=6)
    accumulated_backward(model, [(batch, labels)], loss_fn)
    loss_fn(reference(batch.flatten(0, 1)).view(8, 2, -1), labels).backward()
    assert relative_error(gradients(model), gradients(reference)) < 1e-5


def test_one_micro_batch_takes_the_plain_step_with_one_forward_pass():
    # Drop-path on, BatchNorm in training mode: the plain step must still give the gradients,
    # running statistics and RNG use of the cached step over the same batch in two halves.
    model = make_model("test_efficientnet", drop_path_rate=0.3).train()
    cached = copy.deepcopy(model)
    batch, labels = make_batch(images=8, seed=8)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))

    torch.manual_seed(5)
    loss = cached_backward(model, [(batch, labels)], loss_fn)
    torch.manual_seed(5)
    reference = loss_fn(cached(batch.flatten(0, 1)).view(8, 2, -1), labels)
    reference.backward()

    assert len(forwards) == 1  # no graph-free first pass
    assert float(loss) == pytest.approx(float(reference.detach()), rel=1e-6)
    assert relative_error(gradients(model), gradients(cached)) < 1e-6
    for ours, theirs in zip(model.buffers(), cached.buffers(), strict=True):
        assert torch.equal(ours, theirs)

    untouched = make_model()
    broken = cached_backward(untouched, [(batch, labels)], lambda e, y: loss_fn(e, y) * 1e39)
    assert not torch.isfinite(broken)
    assert all(p.grad is None for p in untouched.parameters())


def test_non_finite_loss_accumulates_nothing():
    model = make_model()
    batch, labels = make_batch(images=8, seed=7)

    def broken(embeddings, labels):
        return supcon_loss(embeddings, labels) * float("nan")

    loss = cached_backward(model, split(batch, labels, 4), broken)
    assert not torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters())


def test_bf16_autocast_cached_step_runs_close_to_fp32():
    model = make_model()
    reference = copy.deepcopy(model)
    batch, labels = make_batch(seed=8)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    cached_backward(model, split(batch, labels, 8), loss_fn, autocast=bf16)
    cached_backward(reference, split(batch, labels, 8), loss_fn)
    assert relative_error(gradients(model), gradients(reference)) < 0.1


def test_compiled_model_replays_the_same_dropout_masks():
    """Under --compile the two passes must still draw the same masks (eager random numbers)."""
    from ascension_cli.runtime import compile_model

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.5),
            torch.nn.Linear(8, 4),
        )

    images = torch.randn(2, 4, 2, 3, 12, 12)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]).view(2, 4)
    batches = [(images[i], labels[i]) for i in range(2)]
    gradients = {}
    for compiled in (False, True):
        model = build().train()
        runner = compile_model(model) if compiled else model
        torch.manual_seed(1)
        loss = cached_backward(runner, batches, lambda z, y: supcon_loss(
            torch.nn.functional.normalize(z, dim=-1), y, 0.5))
        gradients[compiled] = (float(loss), [p.grad.clone() for p in model.parameters()])
    assert gradients[True][0] == pytest.approx(gradients[False][0], rel=1e-5)
    for eager, compiled in zip(gradients[False][1], gradients[True][1], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


class StopAfter:
    """should_stop that says yes from its ``calls``-th question on (a signal mid-step)."""

    def __init__(self, calls: int):
        self.calls, self.asked = calls, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked >= self.calls


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


@pytest.mark.parametrize(("backward", "calls"), [
    (cached_backward, 2),   # in the graph-free first pass
    (cached_backward, 6),   # in the replay, after some gradients were accumulated
    (accumulated_backward, 3),
])
def test_a_stop_mid_step_abandons_it_and_leaves_the_model_as_before(backward, calls):
    from ascension_cli.train.gradcache import StepAbandoned

    model = make_model("test_efficientnet", drop_path_rate=0.2).train()  # BatchNorm, drop-path
    batch, labels = make_batch()
    before, rng = batchnorm_state(model), torch.get_rng_state()
    should_stop = StopAfter(calls)
    with pytest.raises(StepAbandoned):
        backward(model, split(batch, labels, 4), loss_fn, should_stop=should_stop)
    assert should_stop.asked == calls  # it stopped at the first micro-batch after the signal
    after = batchnorm_state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_should_stop_never_saying_yes_changes_nothing():
    model = make_model()
    reference = copy.deepcopy(model)
    batch, labels = make_batch()
    cached_backward(model, split(batch, labels, 4), loss_fn, should_stop=lambda: False)
    cached_backward(reference, split(batch, labels, 4), loss_fn)
    assert torch.equal(gradients(model), gradients(reference))
