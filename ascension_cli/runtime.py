"""Device, precision and process-group choices shared by training and embedding."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from ascension_cli.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an explicit choice must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("{device} cuda: no CUDA device is available here; use {device} cpu",
                              options=("device",))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{{device}} {name}: only {torch.cuda.device_count()} CUDA device(s) exist",
                options=("device",))
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError("{device} mps: Apple MPS is not available here; use {device} cpu",
                          options=("device",))
    return device


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """Data-loading processes; ``None`` picks by device.

    On a GPU, up to 8 (one per core) keep it fed. On the CPU the model's threads already use
    every core, so loader processes compete with it: measured on 2 cores, 0 workers trained 13 %
    and embedded 15-25 % faster than 2 (decoding is a few percent of a step there). One worker per
    8 cores is kept for large photos.
    """
    if workers is not None:
        return workers
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type in ("cuda", "mps") else min(8, cores // 8)


def _cpu_has_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on Ampere+ GPUs and bf16-capable CPUs, fp16 on older GPUs, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and _cpu_has_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("{precision} fp16 needs a CUDA device; use bf16 or fp32 here",
                          options=("precision",))
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("{precision} bf16: this GPU does not support bf16; use fp16 or fp32",
                          options=("precision",))
    if precision == "bf16" and device.type == "mps":
        raise ConfigError("{precision} bf16 is not supported on MPS; use fp32",
                          options=("precision",))
    return precision


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A zero-argument context factory: autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def use_channels_last(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Store the model's 4-D weights channels-last (NHWC), or channels-first (NCHW) when not
    ``enabled``; returns the model.

    Convolutions run faster on NHWC data with oneDNN (on the CPU, measured 1.4-1.6x for
    embedding and 1.3-1.8x for a training step) and with cuDNN under AMP; the input
    must be NHWC too (``to_input``).
    """
    layout = torch.channels_last if enabled else torch.contiguous_format
    try:
        model.to(memory_format=layout)
    except RuntimeError:  # a 5-D weight (Conv3d) has no channels_last: keep the plain layout
        model.to(memory_format=torch.contiguous_format)
    return model


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` the model, drawing random numbers exactly as eager mode does.

    Inductor would otherwise generate dropout and drop-path masks with its own kernels, which
    differ between the graph-free and the graph pass: gradient caching replays the RNG state
    between them and needs the same masks in both.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    return torch.compile(model)


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch ``(B, C, H, W)`` or ``(B, V, C, H, W)`` on ``device`` in the layout asked for.

    Channels-last means each pixel's channels are adjacent in memory; for the 5-D multi-view
    batch the views are then flattened into the batch by a view, not a copy. Already in that
    layout (the loader's), nothing is copied.
    """
    images = images.to(device, non_blocking=True)
    if not channels_last:
        return images.contiguous()
    if images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images.movedim(-3, -1).contiguous().movedim(-1, -3)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU)."""
    import torch.distributed as dist

    if not launched_by_torchrun():
        return DistributedContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistributedContext(dist.get_rank(), dist.get_world_size(),
                              int(os.environ.get("LOCAL_RANK", "0")))
