"""Any pytorch-metric-learning loss under gradient caching (`--loss pml:NAME`): the cached step
equals the true full batch for the model and the loss's own parameters (proxies), over DDP too;
training saves and resumes the proxies exactly; bad names and options are one line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("pytorch_metric_learning")

from ascension_cli.losses import pml_loss  # noqa: E402
from ascension_cli.train.distributed import gather_with_grad  # noqa: E402
from ascension_cli.train.gradcache import cached_backward  # noqa: E402
from ascension_cli.train.loop import train  # noqa: E402
from tests.test_gradcache import gradients, make_batch, make_model, relative_error, split  # noqa: E402
from tests.test_train import config, train_error  # noqa: E402

LOSSES = {"ProxyAnchorLoss": {}, "MultiSimilarityLoss": {}, "ContrastiveLoss": {},
          "ArcFaceLoss": {"scale": 16}}


def fresh_loss(name: str):
    torch.manual_seed(1)  # the same proxies for the cached and the reference step
    return pml_loss(name, LOSSES[name], num_classes=4, embedding_size=16)


def full_batch_step(model, loss, batch, labels):
    embeddings = model(batch.flatten(0, 1)).view(len(batch), batch.shape[1], -1)
    value = loss(embeddings, labels)
    value.backward()
    return value.detach()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_cached_step_equals_the_true_full_batch(name):
    model, loss = make_model(), fresh_loss(name)
    reference, reference_loss = copy.deepcopy(model), copy.deepcopy(loss)
    batch, labels = make_batch()

    cached = cached_backward(model, split(batch, labels, 4), loss)
    full = full_batch_step(reference, reference_loss, batch, labels)

    assert float(cached) == pytest.approx(float(full), rel=1e-5)
    assert relative_error(gradients(model), gradients(reference)) < 1e-4
    own = list(loss.parameters())
    assert bool(own) == (name in ("ProxyAnchorLoss", "ArcFaceLoss"))
    for mine, theirs in zip(own, reference_loss.parameters(), strict=True):
        assert relative_error(mine.grad, theirs.grad) < 1e-4


def _rank(rank: int, world: int, init_file: str, output: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    loss = fresh_loss("ProxyAnchorLoss")
    images, labels = make_batch()
    share = len(images) // world
    mine = slice(rank * share, (rank + 1) * share)
    micro = [(images[mine][i : i + 4], labels[mine][i : i + 4]) for i in range(0, share, 4)]
    value = cached_backward(model, micro, loss, no_sync=model.no_sync, gather=gather_with_grad)
    torch.save({"loss": value, "grads": {n: p.grad for n, p in model.module.named_parameters()},
                "proxies": [p.grad for p in loss.parameters()]}, f"{output}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_equal_one_with_the_whole_batch_proxies_included(tmp_path):
    output = str(tmp_path / "rank")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), output), nprocs=2, join=True)
    model, loss = make_model(), fresh_loss("ProxyAnchorLoss")
    batch, labels = make_batch()
    full = full_batch_step(model, loss, batch, labels)
    for rank in range(2):  # every rank holds the whole batch's gradients, proxies too
        found = torch.load(f"{output}.{rank}", weights_only=True)
        assert float(found["loss"]) == pytest.approx(float(full), rel=1e-5)
        for name, parameter in model.named_parameters():
            assert relative_error(found["grads"][name], parameter.grad) < 1e-5, name
        for theirs, mine in zip(found["proxies"], loss.parameters(), strict=True):
            assert relative_error(theirs, mine.grad) < 1e-5


def test_training_keeps_the_proxies_and_resumes_them_exactly(dataset, tmp_path):
    options = dict(loss="pml:ProxyAnchorLoss", loss_option=["margin=0.2", "alpha=16"],
                   epochs=2)
    train(config(dataset, tmp_path / "whole", **options))
    first = train(config(dataset, tmp_path / "parts", **options),
                  stop_after_epoch=lambda epoch: epoch == 1)
    assert first.stopped_early
    train(config(dataset, tmp_path / "parts", resume="auto", **options))

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    proxies = whole["loss"]["loss.proxies"]
    assert proxies.shape == (4, whole["spec"]["num_features"])  # a class each, features wide
    assert torch.equal(proxies, parts["loss"]["loss.proxies"])
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name
    # The proxies trained at 100 x the step's LR, in a group of their own.
    groups = whole["optimizer"]["param_groups"]
    assert groups[-1]["initial_lr"] == pytest.approx(100 * groups[0]["initial_lr"])


@pytest.mark.parametrize(("arguments", "message"), [
    (["--loss", "pml:NoSuchLoss"], "no pytorch-metric-learning loss 'NoSuchLoss'"),
    (["--loss", "triplet"], "give supcon, or pml:NAME"),
    (["--loss", "pml:ProxyAnchorLoss", "--loss-option", "margin"], "give key=value"),
    (["--loss", "pml:ProxyAnchorLoss", "--loss-option", "colour=1"],
     "ProxyAnchorLoss takes no option 'colour'; it takes alpha, "),
    (["--loss", "pml:ProxyAnchorLoss", "--loss-option", "margin=x"], "ProxyAnchorLoss(margin='x')"),
    (["--loss", "pml:ProxyAnchorLoss", "--temperature", "0.2"], "--temperature is SupCon's"),
    (["--loss-option", "margin=0.1"], "applies to a pml: loss"),
])
def test_bad_losses_and_options_end_in_one_line(dataset, tmp_path, arguments, message):
    assert message in train_error(dataset, tmp_path / "run", *arguments)
