"""DistributedDataParallel helpers: rank seeds, a gradient-carrying all_gather, a shared stop.

Joining torchrun's process group is ``runtime.init_distributed`` (embedding uses it too).

SupCon contrasts every sample with every other, so plain DDP (each rank its own loss) would
contrast only a rank's own share of the batch. Each rank instead gathers every rank's embeddings,
its own slice still attached to its graph, and computes the loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's own randomness (dropout, drop-path masks) under DDP: distinct per
    rank, and after a resume at ``step`` distinct from the masks drawn before it. The factors
    are primes, so (rank, step) pairs cannot collide for any realistic rank or step count."""
    return seed + 7919 * rank + 104729 * step


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``local`` (rank order); this rank's slice keeps its graph.

    Ranks may hold different numbers of rows (an unreadable image dropped on one rank): rows are
    padded to the largest count for the collective, then trimmed.
    """
    world = dist.get_world_size()
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local.detach()
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    pieces = [piece[:size] for piece, size in zip(pieces, sizes, strict=True)]
    pieces[dist.get_rank()] = local
    return torch.cat(pieces)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any (so all ranks stop at the same step)."""
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
