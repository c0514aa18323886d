"""The cross-batch memory (`--memory-batches`): SupCon with memory keys against a per-anchor
loop, the memory's first-in-first-out order, the cached step against the true full batch with
a filled memory, a resume that contrasts with the same keys, and the bad combinations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ascension_cli import losses
from ascension_cli.losses import CrossBatchMemory, SupConTerms, supcon_loss
from ascension_cli.train.gradcache import cached_backward
from ascension_cli.train.loop import train
from tests.test_gradcache import gradients, make_batch, make_model, relative_error, split
from tests.test_train import config, train_error


def reference_with_memory(z, labels, keys, key_labels, temperature) -> float:
    """L_out anchor by anchor in float64: the anchors are the batch's rows, their "others" the
    batch's other rows and every filled key, their positives those of their class."""
    z, keys = z.double(), keys.double()
    others = [(z[a], labels[a], a) for a in range(len(z))]
    others += [(keys[k], key_labels[k], None) for k in range(len(keys)) if key_labels[k] >= 0]
    total, anchors = 0.0, 0
    for i in range(len(z)):
        rest = [(float(z[i] @ v) / temperature, label) for v, label, a in others if a != i]
        positives = [s for s, label in rest if label == labels[i]]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(s) for s, _ in rest))
        total += sum(log_denominator - s for s in positives) / len(positives)
        anchors += 1
    return total / anchors if anchors else 0.0


def unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("mask_rows", [losses.MASK_ROWS, 1])  # both ways to sum positives
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_supcon_with_memory_matches_the_per_anchor_loop(monkeypatch, mask_rows, temperature):
    monkeypatch.setattr(losses, "MASK_ROWS", mask_rows)
    z, keys = unit(12, 8, 0), unit(10, 8, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 5, 6])  # 5, 6: positives in memory only
    key_labels = torch.tensor([0, 2, 5, 5, 7, -1, -1, 1, 6, 3])  # two empty slots, a class 7
    found = float(supcon_loss(z, labels, temperature, (keys, key_labels)))
    assert found == pytest.approx(
        reference_with_memory(z, labels, keys, key_labels, temperature), rel=1e-5)


def test_an_empty_memory_is_supcon_alone_and_keys_take_no_gradient():
    z = unit(8, 6, 2).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    empty = (torch.randn(5, 6), torch.full((5,), -1))
    assert float(supcon_loss(z, labels, 0.1, empty).detach()) == pytest.approx(
        float(supcon_loss(z, labels, 0.1).detach()), rel=1e-6)
    keys = unit(5, 6, 3).requires_grad_(True)
    supcon_loss(z, labels, 0.1, (keys.detach(), torch.tensor([0, 1, 2, 3, 4]))).backward()
    assert z.grad is not None and keys.grad is None


def test_the_memory_keeps_the_newest_rows_first_and_only_committed_ones():
    memory = CrossBatchMemory(5, 2)
    memory.hold(torch.ones(3, 2), torch.tensor([1, 2, 3]))
    assert memory.key_labels.tolist() == [-1] * 5  # held, not yet committed
    memory.commit()
    memory.hold(torch.full((3, 2), 2.0), torch.tensor([4, 5, 6]))
    memory.commit()
    assert memory.key_labels.tolist() == [4, 5, 6, 1, 2]  # the oldest row fell out
    assert memory.keys[:, 0].tolist() == [2.0, 2.0, 2.0, 1.0, 1.0]
    memory.commit()  # nothing held: nothing changes
    assert memory.key_labels.tolist() == [4, 5, 6, 1, 2]
    memory.hold(torch.zeros(7, 2), torch.arange(7))  # a batch larger than the memory
    memory.commit()
    assert memory.key_labels.tolist() == [0, 1, 2, 3, 4]


def test_the_cached_step_equals_the_true_full_batch_with_a_filled_memory():
    model = make_model()
    batch, labels = make_batch()
    loss = SupConTerms(4, 16, 0.1, 0.0, memory_rows=40)
    loss.memory.hold(unit(24, 16, 4), torch.arange(24) % 5)
    loss.memory.commit()
    reference, reference_loss = copy.deepcopy(model), copy.deepcopy(loss)
    cached = cached_backward(model, split(batch, labels, 4), loss)
    embeddings = reference(batch.flatten(0, 1)).view(len(batch), batch.shape[1], -1)
    full = reference_loss(embeddings, labels)
    full.backward()
    assert float(cached) == pytest.approx(float(full.detach()), rel=1e-5)
    assert relative_error(gradients(model), gradients(reference)) < 1e-4
    assert list(loss.parameters()) == []  # no proxies: nothing for the optimizer


def test_training_fills_the_memory_and_a_resume_contrasts_with_the_same_keys(dataset, tmp_path):
    options = dict(memory_batches=2, epochs=3)
    train(config(dataset, tmp_path / "whole", **options))
    first = train(config(dataset, tmp_path / "parts", **options),
                  stop_after_epoch=lambda epoch: epoch == 1)
    assert first.stopped_early
    train(config(dataset, tmp_path / "parts", resume="auto", **options))

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    target, views = whole["config"]["target_batch"], whole["config"]["views"]
    key_labels = whole["loss"]["memory.key_labels"]
    assert whole["loss"]["memory.keys"].shape == (2 * target * views,
                                                  whole["spec"]["num_features"])
    assert (key_labels >= 0).all()  # 3 epochs of steps filled both batches' rows
    assert torch.equal(key_labels, parts["loss"]["memory.key_labels"])
    assert torch.equal(whole["loss"]["memory.keys"], parts["loss"]["memory.keys"])
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name


@pytest.mark.parametrize(("arguments", "message"), [
    (["--memory-batches", "2", "--loss", "pml:ProxyAnchorLoss"], "--memory-batches is SupCon's"),
    (["--memory-batches", "2", "--accumulation", "naive"], "use --accumulation cache"),
    (["--memory-batches", "-1"], "--memory-batches"),
])
def test_bad_memory_options_end_in_one_line(dataset, tmp_path, arguments, message):
    assert message in train_error(dataset, tmp_path / "run", *arguments)
