"""One optimizer step's gradients over a large contrastive batch, computed in micro-batches.

Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the loss couples every sample in the batch, so plain accumulation cannot split it.
Instead (1) embed every micro-batch without a graph, (2) compute the loss over the whole batch and
backpropagate it to the embeddings only, (3) re-run each micro-batch with a graph and push the
cached embedding gradients through it. Parameter gradients equal those of one true large batch;
peak activation memory is that of one micro-batch. The RNG state is replayed so dropout and
drop-path draw the same masks in both passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Scale = Callable[[torch.Tensor], torch.Tensor]
ShouldStop = Callable[[], bool]


class StepAbandoned(Exception):
    """A stop was asked for part-way through a step. The model is as it was before the step
    (BatchNorm statistics and RNG state restored); the caller discards its ``.grad``."""


def _identity(loss: torch.Tensor) -> torch.Tensor:
    return loss


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _batchnorm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """BatchNorm running statistics, to undo the first pass's update (the replay updates them)."""
    pairs = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    pairs.append((buffer, buffer.clone()))
    return pairs


def _abandon_if_asked(
    should_stop: ShouldStop | None,
    saved_buffers: list[tuple[torch.Tensor, torch.Tensor]],
    rng: tuple[torch.Tensor, torch.Tensor | None],
    device: torch.device,
) -> None:
    """Between micro-batches: when ``should_stop()``, undo the step so far, raise StepAbandoned."""
    if should_stop is None or not should_stop():
        return
    for buffer, saved in saved_buffers:
        buffer.copy_(saved)
    _set_rng_state(rng, device)
    raise StepAbandoned


def _views(images: torch.Tensor) -> int:
    return images.shape[1] if images.dim() == 5 else 1


def _contrast_and_backward(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    views: int,
    loss_fn: LossFn,
    scale: Scale,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """The loss over the whole batch (every rank's, with ``gather``), backpropagated to
    ``embeddings`` when finite; returns it detached. The world-size factor on this rank's
    embedding gradients undoes DDP's averaging of parameter gradients (see ``cached_backward``);
    a loss's own parameters (proxies) see the whole batch on every rank, so theirs is left out."""
    if gather is not None:
        ranks = torch.distributed.get_world_size()
        if ranks > 1 and embeddings.requires_grad:
            embeddings.register_hook(lambda gradient: gradient * ranks)
        embeddings, labels = gather(embeddings), gather(labels)
    loss = loss_fn(embeddings.view(-1, views, embeddings.shape[-1]), labels)
    if torch.isfinite(loss):
        scale(loss).backward()
    return loss.detach()


def _flatten_views(images: torch.Tensor) -> torch.Tensor:
    # (B, V, C, H, W) -> (B*V, C, H, W): image-major, so rows reshape back to (B, V, D).
    return images.reshape(-1, *images.shape[2:]) if images.dim() == 5 else images


def cached_backward(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    scale: Scale = _identity,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradients of ``loss_fn`` over all micro-batches at once.

    Args:
        micro_batches: ``(images (B, V, C, H, W), labels (B,))`` pairs on the model's device.
        loss_fn: ``(embeddings (N, V, D), labels (N,)) -> scalar`` over the whole batch.
        scale: applied to the loss before backward (a GradScaler's ``scale``).
        no_sync: DDP's ``no_sync``; gradients are then reduced once, on the last micro-batch.
        gather: under DDP, concatenates every rank's embeddings (and labels) with this rank's
            slice still attached, so the loss covers the global batch. Each rank then holds the
            full gradient of its own embeddings; it is multiplied by the world size because DDP
            averages parameter gradients over ranks, and the global batch's gradient is their sum.
        should_stop: asked between micro-batches; True abandons the step (``StepAbandoned``),
            so a stop signal is honoured within a micro-batch's time, however large the batch.

    Returns the detached loss. When it is not finite nothing is accumulated, so the caller can
    skip the step. A single micro-batch (the target batch fits in memory) takes the ordinary
    step, since caching would only add a graph-free forward pass.
    """
    if len(micro_batches) == 1:
        return _plain_backward(model, micro_batches[0], loss_fn, autocast, scale, gather)
    return _two_pass_backward(model, micro_batches, loss_fn, autocast, scale, no_sync, gather,
                              should_stop)


def _two_pass_backward(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    scale: Scale = _identity,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """Steps (1)-(3) of the module docstring, for any number of micro-batches."""
    labels = torch.cat([batch_labels for _, batch_labels in micro_batches])
    device = micro_batches[0][0].device
    states, cached = [], []
    saved_buffers = _batchnorm_buffers(model)
    with torch.no_grad():
        for images, _ in micro_batches:
            states.append(_rng_state(device))
            _abandon_if_asked(should_stop, saved_buffers, states[0], device)
            with autocast():
                cached.append(model(_flatten_views(images)).float())
    for buffer, saved in saved_buffers:
        buffer.copy_(saved)

    sizes = [embedding.shape[0] for embedding in cached]
    embeddings = torch.cat(cached).detach().requires_grad_(True)
    loss = _contrast_and_backward(embeddings, labels, _views(micro_batches[0][0]), loss_fn,
                                  scale, gather)
    if not torch.isfinite(loss):
        return loss
    gradients = embeddings.grad.split(sizes)

    last = len(micro_batches) - 1
    for position, ((images, _), gradient, state) in enumerate(
        zip(micro_batches, gradients, states, strict=True)
    ):
        _abandon_if_asked(should_stop, saved_buffers, states[0], device)
        _set_rng_state(state, device)
        sync = no_sync() if no_sync is not None and position < last else nullcontext()
        with sync:
            with autocast():
                output = model(_flatten_views(images))
            output.float().backward(gradient)
    return loss


def _plain_backward(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn,
    autocast: Callable[[], AbstractContextManager],
    scale: Scale,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """One forward and backward over the whole batch: the gradients ``cached_backward`` gives."""
    images, labels = batch
    with autocast():
        embeddings = model(_flatten_views(images)).float()
    return _contrast_and_backward(embeddings, labels, _views(images), loss_fn, scale, gather)


def accumulated_backward(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    scale: Scale = _identity,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """Plain gradient accumulation: the loss is computed inside each micro-batch alone.

    Kept for comparison (``--accumulation naive``): each micro-batch is its own, weaker
    contrastive problem. Returns the mean micro-batch loss, detached. ``should_stop`` as in
    ``cached_backward``.
    """
    device = micro_batches[0][0].device
    total = torch.zeros((), device=device)
    count = len(micro_batches)
    last = count - 1
    saved_buffers = _batchnorm_buffers(model) if should_stop is not None else []
    rng = _rng_state(device)
    for position, (images, labels) in enumerate(micro_batches):
        _abandon_if_asked(should_stop, saved_buffers, rng, device)
        views = _views(images)
        sync = no_sync() if no_sync is not None and position < last else nullcontext()
        with sync:
            with autocast():
                output = model(_flatten_views(images))
            loss = loss_fn(output.float().view(-1, views, output.shape[-1]), labels)
            if not torch.isfinite(loss):
                return loss.detach()
            scale(loss / count).backward()
        total += loss.detach()
    return total / count
