import math

import pytest
import torch
import torch.nn.functional as F

from ascension_cli import losses
from ascension_cli.losses import MASK_ROWS, supcon_loss


@pytest.fixture(params=["label mask", "class sums"], autouse=True)
def positives_from(request, monkeypatch):
    """Every test runs on both ways of summing the positives (chosen by batch size)."""
    if request.param == "class sums":
        monkeypatch.setattr(losses, "MASK_ROWS", 1)
    return request.param


def reference_supcon(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """The paper's L_out written anchor by anchor, in float64 Python loops."""
    z = embeddings.double()
    total, anchors = 0.0, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(
            math.exp(float(z[i] @ z[a]) / temperature) for a in range(len(z)) if a != i
        )
        anchor_loss = -sum(
            math.log(math.exp(float(z[i] @ z[p]) / temperature) / denominator) for p in positives
        ) / len(positives)
        total += anchor_loss
        anchors += 1
    return total / anchors if anchors else 0.0


def random_batch(n: int, dim: int, classes: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return embeddings, labels


@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_anchor_reference(temperature, seed):
    embeddings, labels = random_batch(24, 8, 5, seed)
    ours = supcon_loss(embeddings, labels, temperature)
    assert float(ours) == pytest.approx(reference_supcon(embeddings, labels, temperature), rel=1e-5)


def test_both_ways_chosen_by_size_match_the_reference():
    for n in (MASK_ROWS, MASK_ROWS + 8):  # the real threshold, whatever the fixture set
        embeddings, labels = random_batch(n, 6, n // 6, n)
        ours = supcon_loss(embeddings, labels, 0.1)
        assert float(ours) == pytest.approx(reference_supcon(embeddings, labels, 0.1), rel=1e-5)


def test_anchors_without_positive_are_left_out():
    embeddings, _ = random_batch(6, 4, 1, 3)
    labels = torch.tensor([0, 0, 1, 2, 3, 3])  # classes 1 and 2 have no positive
    ours = supcon_loss(embeddings, labels, 0.1)
    assert float(ours) == pytest.approx(reference_supcon(embeddings, labels, 0.1), rel=1e-5)


def test_no_positive_at_all_gives_zero_and_backward_runs():
    embeddings = F.normalize(torch.randn(5, 4), dim=1).requires_grad_(True)
    loss = supcon_loss(embeddings, torch.arange(5), 0.1)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_views_layout_equals_flattened_rows():
    embeddings, labels = random_batch(12, 6, 3, 4)
    by_view = embeddings.view(6, 2, 6)
    image_labels = labels[:6]
    flattened = supcon_loss(by_view.reshape(12, 6), image_labels.repeat_interleave(2), 0.1)
    assert torch.allclose(supcon_loss(by_view, image_labels, 0.1), flattened)


def test_matches_pytorch_metric_learning():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    for seed in range(3):
        embeddings, labels = random_batch(32, 16, 6, seed)
        theirs = pml_losses.SupConLoss(temperature=0.1)(embeddings, labels)
        assert float(supcon_loss(embeddings, labels, 0.1)) == pytest.approx(float(theirs), rel=1e-5)


def test_gradient_matches_reference_autograd():
    embeddings, labels = random_batch(10, 4, 3, 5)
    ours = embeddings.clone().double().requires_grad_(True)
    supcon_loss(ours, labels, 0.2).backward()

    reference = embeddings.clone().double().requires_grad_(True)
    z = reference
    terms = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        others = torch.stack([z[i] @ z[a] / 0.2 for a in range(len(z)) if a != i])
        log_denominator = torch.logsumexp(others, dim=0)
        terms.append(-torch.stack([z[i] @ z[p] / 0.2 - log_denominator for p in positives]).mean())
    torch.stack(terms).mean().backward()
    # Ours computes in fp32 by design; the reference runs in fp64.
    assert torch.allclose(ours.grad, reference.grad, rtol=1e-5, atol=1e-6)


def test_fp32_under_autocast_and_stable_at_tiny_temperature():
    embeddings, labels = random_batch(16, 8, 4, 6)
    half = embeddings.to(torch.bfloat16)
    loss = supcon_loss(half, labels, 0.001)  # logits up to 1000: exp would overflow naively
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(torch.randn(4, 3), torch.arange(3))


@pytest.mark.parametrize("views", [2, 3])
def test_the_instance_term_is_supcon_over_photos_mixed_in_by_its_weight(views):
    embeddings, labels = random_batch(8 * views, 6, 3, views)
    by_view, image_labels = embeddings.view(8, views, 6), labels[:8]
    rows_of_photos = torch.arange(8).repeat_interleave(views)
    expected = (0.7 * reference_supcon(embeddings, image_labels.repeat_interleave(views), 0.1)
                + 0.3 * reference_supcon(embeddings, rows_of_photos, 0.1))
    ours = losses.supcon_with_instances(by_view, image_labels, 0.1, instance_weight=0.3)
    assert float(ours) == pytest.approx(expected, rel=1e-5)


def test_no_instance_weight_is_supcon_and_one_view_is_refused():
    embeddings, labels = random_batch(12, 6, 3, 5)
    assert torch.equal(losses.supcon_with_instances(embeddings, labels, 0.1),
                       supcon_loss(embeddings, labels, 0.1))
    with pytest.raises(ValueError, match="two views"):
        losses.supcon_with_instances(embeddings.view(12, 1, 6), labels, 0.1, 0.1)
