"""Build everything a training run needs, in the order it is needed, into one frozen ``Run``.

``build_run`` reads top to bottom like nanoGPT's set-up: the machine (device, processes,
precision), the checkpoint to resume, the data and its split, the options fitted to the data, the
model and its DDP / compiled wrappers, the configuration written, the loaders and the sampler,
then the optimizer, schedule, scaler, loss and the step. Each part is built by one function from
the parts before it, never from attributes set elsewhere; the trainer (``loop.py``) only runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from ascension_cli.atomic import atomic_write_text
from ascension_cli.config import TrainConfig, check_resumable, to_plain
from ascension_cli.config.fields import DATA_DEFAULTS, PML_PREFIX
from ascension_cli.data.splits import TrainData, training_data
from ascension_cli.errors import CheckpointError, ConfigError, Wording, first_line
from ascension_cli.formats import LAST_CHECKPOINT, RUN_CONFIG
from ascension_cli.losses import SupConWithProxies, pml_loss, supcon_loss, supcon_with_instances
from ascension_cli.model.backbone import EmbeddingModel, ModelSpec, build_model
from ascension_cli.model.checkpoint import damaged_entry, load_checkpoint, rebuild_model
from ascension_cli.model.stages import freeze_stages, stage_count
from ascension_cli.runtime import (
    DistributedContext,
    autocast_factory,
    compile_model,
    init_distributed,
    resolve_device,
    resolve_precision,
    resolve_workers,
    use_channels_last,
)
from ascension_cli.train.average import WeightAverage
from ascension_cli.train.colour import measure_colour
from ascension_cli.train.distributed import gather_with_grad, rank_seed
from ascension_cli.train.gradcache import accumulated_backward, cached_backward
from ascension_cli.train.loaders import Exclusions, Loaders, build_loaders
from ascension_cli.train.logbook import data_rows
from ascension_cli.train.plan import (
    RunPlan,
    check_plan,
    fitted,
    plan_run,
    planned_augmentation,
    planned_before,
    planned_frozen_stages,
    recorded_augmentation,
    recorded_frozen_stages,
    settled,
)
from ascension_cli.train.proxy_start import PHOTOS_PER_CLASS, start_proxies
from ascension_cli.train.reporter import Reporter
from ascension_cli.train.schedule import adamw, warmup_then
from ascension_cli.train.stopping import StopRequest


@dataclass(frozen=True)
class Machine:
    """Where the run computes: device, process group, precision, loader processes."""

    device: torch.device
    distributed: DistributedContext
    precision: str
    workers: int
    autocast: Callable[[], Any]


@dataclass(frozen=True)
class Networks:
    """The model (saved and validated) and what the steps run (DDP / compiled wrappers)."""

    model: EmbeddingModel
    spec: ModelSpec
    trained: torch.nn.Module
    no_sync: Callable | None  # DDP's: skip the all-reduce of a step's first backward passes
    compile_errors: tuple[type[Exception], ...]
    frozen_stages: tuple[int, str]  # the stages kept at their starting weights, and why


@dataclass(frozen=True)
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: Callable
    loss_module: torch.nn.Module | None  # a loss with its own parameters (proxies)
    backward: Callable  # cached_backward or accumulated_backward
    step_options: dict[str, Any]  # no_sync, should_stop, gather
    should_stop: Callable[[], bool] | None  # abandon a step part-way (a single process only)
    average: WeightAverage | None  # --ema-decay: what validation and checkpoints hold


@dataclass(frozen=True)
class Run:
    """Everything built for one training run; ``checkpoint`` is the payload to resume from."""

    config: TrainConfig
    plan: RunPlan  # every setting the options left to the data, resolved once
    resolved: dict[str, Any]  # the options as run, written to config.yaml
    save_dir: Path
    machine: Machine
    checkpoint: dict[str, Any] | None
    data: TrainData
    nets: Networks
    loaders: Loaders
    opt: Optimisation
    reporter: Reporter
    # Features and labels as last embedded, by the photos ("val", "gallery") and the optimizer
    # step they were embedded at: a second search with the same weights reuses them
    # (train/validation.py), the start's gallery check the colour test's (train/colour.py).
    embedded: dict[tuple[str, int], tuple[Any, Any]] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def stateful(self) -> dict[str, Any]:
        """The parts whose ``state_dict`` a checkpoint keeps, by checkpoint key."""
        parts = {"optimizer": self.opt.optimizer, "scheduler": self.opt.scheduler,
                 "scaler": self.opt.scaler, "excluded": Exclusions(self.loaders.sampler)}
        if self.opt.loss_module is not None:
            parts["loss"] = self.opt.loss_module  # the loss's proxies
        if self.opt.average is not None:
            parts["average"] = self.opt.average  # the trained weights (the model: the average)
        return parts


def build_run(config: TrainConfig, reporter: Reporter, stop: StopRequest) -> Run:
    """Everything the run needs, built in this order (see the module notes)."""
    machine = _machine(config)
    if not machine.distributed.is_main:
        reporter = Reporter()  # one voice: rank 0 reports, writes and saves
    # Same initial weights everywhere (DDP also broadcasts them); each rank its own dropout.
    torch.manual_seed(config.seed)
    save_dir = Path(config.save_dir)
    checkpoint = _checkpoint_to_resume(config, save_dir, reporter)
    source = resumed_path(config, save_dir)
    data = training_data(config.data_root, config.val_root, config.val_fraction, config.seed,
                         "val_fraction" in config.model_fields_set, config.cache_images)
    given = frozenset(config.model_fields_set)
    config, notes = fitted(config, data, machine.distributed.world_size)
    for note in notes:
        reporter.message(note)
    if checkpoint is not None:  # the options fitted as the checkpoint's were
        _check_entries(checkpoint, source)
        check_resumable(checkpoint, config, data.scan.classes)
    nets = _networks(config, checkpoint, machine, data, reporter)
    colour: dict[str, Any] = {}  # the colour test's start features, the gallery check's too
    augmentation = planned_augmentation(config, checkpoint, partial(
        measure_colour, config, data, nets, machine, reporter, colour))
    setup = settled(config, nets.spec.image_size, machine.workers, machine.device.type,
                    checkpoint is not None, augmentation, nets.frozen_stages)
    plan = plan_run(config, len(data.scan.classes), len(data.train_labels), setup, notes, given)
    if checkpoint is not None:
        _check_plan(checkpoint, source, plan, len(data.train_labels))
    resolved = _write_config(config, plan, save_dir, machine, reporter)
    loaders = build_loaders(config.model_copy(update={"augment": plan.augmentation}), data,
                            nets.spec, machine, reporter, stop)
    opt = _optimisation(config, plan, nets, loaders.sampler, machine, stop)
    run = Run(config, plan, resolved, save_dir, machine, checkpoint, data, nets, loaders, opt,
              reporter, start_features(colour, config, data, opt))
    if checkpoint is None and (placed := start_proxies(run)):  # a resume has its proxies
        reporter.message(f"the proxies start at their classes' mean features ({placed} "
                         f"classes, up to {PHOTOS_PER_CLASS} photos each)")
    return run


def start_features(colour: dict[str, Any], config: TrainConfig, data: TrainData,
                   opt: Optimisation) -> dict[tuple[str, int], tuple[Any, Any]]:
    """The colour test's features of every validation photo, and of every training photo where
    the gallery check searches among them all (``--gallery-check`` at least their number), for
    the start's searches."""
    start, step = colour.get("start"), opt.scheduler.last_epoch
    if start is None:
        return {}
    every = 0 < len(data.train_labels) <= config.gallery_check
    return {("val", step): start[0], **({("gallery", step): start[1]} if every else {})}


# ---- the machine, the checkpoint, the options fitted to the data
def _machine(config: TrainConfig) -> Machine:
    device = resolve_device(config.device)
    distributed = init_distributed(device)
    if distributed.enabled:
        world = distributed.world_size
        if device.type == "cuda":
            device = torch.device("cuda", distributed.local_rank)
            torch.cuda.set_device(device)
        if config.target_batch % (config.batch_size * world):
            raise ConfigError(f"{{target_batch}} ({config.target_batch}) must be a multiple of "
                              f"{{batch_size}} ({config.batch_size}) x {world} processes",
                              options=("target_batch", "batch_size"))
        if config.sync_bn and device.type != "cuda":
            raise ConfigError("{sync_bn} needs CUDA devices (SyncBatchNorm does not run on CPU)",
                              options=("sync_bn",))
    precision = resolve_precision(config.precision, device)
    return Machine(device, distributed, precision, resolve_workers(config.workers, device),
                   autocast_factory(precision, device))


def resumed_path(config: TrainConfig, save_dir: Path) -> Path:
    """The checkpoint ``--resume`` names (``auto``, or none: the run's own last.pt)."""
    return save_dir / LAST_CHECKPOINT if config.resume in (None, "auto") else Path(config.resume)


def _checkpoint_to_resume(config: TrainConfig, save_dir: Path,
                          reporter: Reporter) -> dict[str, Any] | None:
    path = resumed_path(config, save_dir)
    if config.resume is None:
        if path.exists():
            raise CheckpointError(f"{save_dir} already holds a run ({LAST_CHECKPOINT}); pass "
                                  "{resume} "
                                  "auto to continue it or choose another {save_dir}",
                                  options=("resume", "save_dir"))
        return None
    if path.is_file():
        return load_checkpoint(path)
    if config.resume != "auto":
        raise CheckpointError(f"{{resume}}: checkpoint not found: {path}", options=("resume",))
    reporter.message(f"no {LAST_CHECKPOINT} in {save_dir} yet: starting a new run")
    return None


def _check_plan(checkpoint: dict[str, Any], source: Path, plan: RunPlan, images: int) -> None:
    """The checkpoint's plan against the run's (``check_plan``)."""
    try:
        saved = planned_before(checkpoint, plan, images)
    except (ValueError, TypeError) as exc:
        raise damaged_entry(source, "plan", first_line(exc)) from None
    check_plan(saved, plan)


def _check_entries(checkpoint: dict[str, Any], source: Path) -> None:
    """The entries read before the run is built: what it was trained on and the augmentation
    it chose (the rest is checked where it is loaded, ``Trainer.load_state_dict``)."""
    options = checkpoint.get("config")
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise damaged_entry(source, "config", "not a record of options")
    classes = checkpoint.get("classes")
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise damaged_entry(source, "classes", "not a list of class names")
    if "plan" in checkpoint and not isinstance(checkpoint["plan"], dict):
        raise damaged_entry(source, "plan", "not a run's plan")
    for key, recorded, entry in (("augmentation", recorded_augmentation, "augmentation"),
                                 ("frozen_stages", recorded_frozen_stages, "config")):
        try:
            recorded(checkpoint)
        except ValueError as exc:
            where = "plan" if key in checkpoint.get("plan", {}) else entry
            raise damaged_entry(source, where, first_line(exc)) from None


# ---- the model and its wrappers; the configuration as run
def _networks(config: TrainConfig, checkpoint: dict[str, Any] | None, machine: Machine,
              data: TrainData, reporter: Reporter) -> Networks:
    if checkpoint is not None:
        model, spec = rebuild_model(resumed_path(config, Path(config.save_dir)), checkpoint)
    else:
        model, spec = build_model(
            config.model, embedding_dim=config.embedding_dim, head=config.head,
            image_size=config.image_size, pretrained=config.pretrained, weights=config.weights,
            flip_average=config.flip_average,
        )
    # --flip-average is for the searches after training (the spec keeps it): validation, the
    # colour test and the proxies' start embed without it, so best.pt is chosen as without it
    # (chosen with it, grocery best.pt came from earlier epochs: docs/benchmarks.md round 25).
    model.flip_average = False
    frozen = planned_frozen_stages(config, stage_count(model.backbone), checkpoint)
    _freeze(model, config.model, frozen[0], reporter)
    reporter.table("dataset " + str(config.data_root), data_rows(
        data.scan, len(data.train_index), len(data.val_paths)))
    if data.scan.skipped_lines:
        reporter.message(f"{config.data_root}: {data.scan.skip_summary()}")
    device, distributed = machine.device, machine.distributed
    use_channels_last(model.to(device), config.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trained: torch.nn.Module = model
    no_sync = None
    if distributed.enabled:
        if config.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        no_sync = trained.no_sync
        torch.manual_seed(rank_seed(config.seed, distributed.rank))
    compile_errors: tuple[type[Exception], ...] = ()
    if config.compile:
        from torch._dynamo.exc import TorchDynamoException

        compile_errors = (TorchDynamoException,)
        # Training passes only; validation and saving use the plain module.
        trained = compile_model(trained)
        reporter.message(Wording("{compile}: the first steps compile the model, which takes "
                                 "minutes", ("compile",)))
    return Networks(model, spec, trained, no_sync, compile_errors, frozen)


def _freeze(model: EmbeddingModel, name: str, count: int, reporter: Reporter) -> None:
    """``--frozen-stages``: the stem and the first ``count`` stages of the model ``name`` kept
    at the starting weights."""
    try:
        kept = freeze_stages(model, count)
    except ValueError as exc:
        raise ConfigError(f"{{frozen_stages}} {count} with {name}: {exc}",
                          options=("frozen_stages",)) from None
    if kept:
        total = sum(parameter.numel() for parameter in model.parameters())
        reporter.message(Wording(
            f"{{frozen_stages}} {count}: the stem and the first {count} stages keep their "
            f"starting weights ({kept:,} of {total:,})", ("frozen_stages",)))


def _write_config(config: TrainConfig, plan: RunPlan, save_dir: Path, machine: Machine,
                  reporter: Reporter) -> dict[str, Any]:
    """config.yaml: the options as run, with what was resolved from the machine, the model and
    the data (the plan, printed once with its reasons)."""
    resolved = to_plain(config)
    if config.augment == "auto":
        resolved.update(resolved_augment=plan.augmentation)
    for option in (*DATA_DEFAULTS, "frozen_stages"):
        if getattr(config, option) is None:
            resolved[f"resolved_{option}"] = getattr(plan, option)
    resolved.update(image_size=plan.image_size, workers=plan.workers,
                    resolved_device=str(machine.device), resolved_precision=machine.precision,
                    step_lr=plan.step_lr, plan=plan.to_dict())
    if machine.distributed.enabled:
        resolved.update(processes=machine.distributed.world_size)
    if machine.distributed.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(save_dir / RUN_CONFIG, yaml.safe_dump(resolved, sort_keys=False))
    reporter.table("configuration", [(key, str(value)) for key, value in resolved.items()
                                      if key != "plan"])
    reporter.table("plan", plan.rows())
    return resolved


# ---- the optimisation and the step
def _loss(config: TrainConfig, plan: RunPlan, spec: ModelSpec,
          device: torch.device) -> tuple[Callable, torch.nn.Module | None]:
    """The loss over a whole batch: SupCon (with its instance term; with a proxy term: a
    module), or the pml: loss (a module, maybe with proxies)."""
    width = spec.num_features if spec.head == "none" else spec.embedding_dim
    weight, temperature, classes = plan.proxy_weight, plan.temperature, plan.classes
    if config.loss == "supcon" and weight:
        generator = torch.Generator().manual_seed(config.seed)  # the run's streams untouched
        module = SupConWithProxies(classes, width, temperature, weight, generator,
                                   config.instance_weight).to(device)
        return module, module
    if config.loss == "supcon" and config.instance_weight:
        return partial(supcon_with_instances, temperature=temperature,
                       instance_weight=config.instance_weight), None
    if config.loss == "supcon":
        return partial(supcon_loss, temperature=temperature), None
    try:
        module = pml_loss(config.loss.removeprefix(PML_PREFIX), config.loss_options, classes,
                          width)
    except ValueError as exc:
        raise ConfigError(f"{{loss_option}}: {exc}", options=("loss_option",)) from None
    module = module.to(device)
    return module, module


def _optimisation(config: TrainConfig, plan: RunPlan, nets: Networks, sampler,
                  machine: Machine, stop: StopRequest) -> Optimisation:
    total_steps, step_lr = plan.total_steps, plan.step_lr
    optimizer = adamw(nets.model, step_lr, config.weight_decay, config.backbone_lr_scale)
    loss_fn, loss_module = _loss(config, plan, nets.spec, machine.device)
    own = list(loss_module.parameters()) if loss_module is not None else []
    if own and machine.distributed.enabled and config.accumulation == "naive":
        raise ConfigError("{accumulation} naive would train the loss's own parameters "
                          "(proxies) apart in each process (each sees its micro-batches only): "
                          "use {accumulation} cache", options=("accumulation",))
    if own:  # proxies: their own LR (as PML's docs and the ProxyAnchor paper train them)
        optimizer.add_param_group({"params": own, "lr": step_lr * config.loss_lr_scale,
                                   "weight_decay": 0.0})
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then(plan.lr_schedule, total_steps, plan.warmup_steps))
    scaler = torch.amp.GradScaler(machine.device.type, enabled=machine.precision == "fp16")
    # A single process abandons a step when asked to stop (under DDP every rank would have to
    # agree at each micro-batch, so there the step finishes first).
    distributed = machine.distributed.enabled
    should_stop = None if distributed else (lambda: stop.asked)
    step_options: dict[str, Any] = {"no_sync": nets.no_sync, "should_stop": should_stop}
    if distributed and config.accumulation == "cache":
        step_options["gather"] = gather_with_grad
    decay = plan.ema_decay
    return Optimisation(
        optimizer, scheduler, scaler, loss_fn, loss_module,
        cached_backward if config.accumulation == "cache" else accumulated_backward,
        step_options, should_stop, WeightAverage(nets.model, decay) if decay else None)
