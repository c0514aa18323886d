"""The SupCon training loop, top to bottom: data, model, optimizer, epochs, checkpoints.

Read it like nanoGPT's train.py: set-up first, then one loop whose steps are all in plain sight.
Progress goes to a ``Reporter`` (the CLI draws it with rich; tests collect it), never to a console.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from ascension_cli.atomic import atomic_write, atomic_write_text
from ascension_cli.checkpoint import atomic_save, load_checkpoint, training_state
from ascension_cli.config import TrainConfig, to_plain
from ascension_cli.data.augment import eval_transform, train_transform
from ascension_cli.data.cache import DecodedImages, available_memory
from ascension_cli.data.dataset import EvalDataset, Failed, MultiViewDataset, collate
from ascension_cli.data.folder import FolderScan, scan_folder, stratified_split
from ascension_cli.data.sampler import ClassBalancedBatchSampler, fit_batches
from ascension_cli.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    TrainingError,
    first_line,
)
from ascension_cli.inference import extract_features
from ascension_cli.losses import supcon_loss
from ascension_cli.model import ModelSpec, build_model, model_from_spec
from ascension_cli.retrieval.evaluate import evaluate
from ascension_cli.runtime import (
    autocast_factory,
    compile_model,
    resolve_device,
    resolve_precision,
    resolve_workers,
    to_input,
    use_channels_last,
)
from ascension_cli.train.distributed import any_rank, gather_with_grad, init_distributed
from ascension_cli.train.gradcache import StepAbandoned, accumulated_backward, cached_backward
from ascension_cli.train.schedule import adamw, scaled_lr, warmup_cosine, warmup_steps

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
PLOT = "training.png"
CONFIG = "config.yaml"

# Options a resume may change: where and how fast it runs, not what it learns (channels_last and
# compile change only the order of floating-point operations).
RESUME_MAY_CHANGE = {
    "epochs", "workers", "device", "resume", "save_dir", "max_steps", "data_root", "channels_last",
    "compile",
}


class Reporter:
    """What the trainer tells the outside world. The base class ignores everything."""

    def message(self, text: str) -> None: ...

    def table(self, title: str, rows: list[tuple[str, str]]) -> None: ...

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, loss: float, lr: float, images_per_second: float) -> None: ...

    def epoch_end(self, record: EpochRecord) -> None: ...

    def work_start(self, description: str, total: int) -> None:
        """Long preparatory work (such as --cache-images) begins: ``total`` items."""

    def work_advance(self, count: int) -> None: ...

    def work_end(self) -> None: ...


@dataclass
class EpochRecord:
    epoch: int
    step: int
    loss: float | None
    lr: float
    val_recall_at_1: float | None
    images_per_second: float | None
    seconds: float
    data_wait_fraction: float | None = None
    nonfinite_steps: int = 0
    best: bool = False
    below_untrained: bool = False  # validation recall@1 not above the untrained model's


@dataclass
class TrainResult:
    save_dir: Path
    history: list[EpochRecord] = field(default_factory=list)
    best_recall_at_1: float | None = None
    stopped_early: bool = False

    @property
    def untrained_recall_at_1(self) -> float | None:
        """Validation recall@1 of the model before training (epoch 0), when measured."""
        first = self.history[0] if self.history else None
        return first.val_recall_at_1 if first is not None and first.epoch == 0 else None


@dataclass
class _Data:
    scan: FolderScan
    train_index: np.ndarray
    val_paths: list[Path]
    val_labels: np.ndarray
    val_skipped: int


def _load_data(config: TrainConfig) -> _Data:
    scan = scan_folder(config.data_root)
    if config.val_root is not None:
        val_scan = scan_folder(config.val_root, classes=scan.classes)
        train_index = np.arange(len(scan))
        return _Data(scan, train_index, val_scan.paths, val_scan.labels,
                     sum(val_scan.skipped.values()))
    train_index, val_index = stratified_split(scan.labels, config.val_fraction, config.seed)
    return _Data(
        scan, train_index, [scan.paths[i] for i in val_index], scan.labels[val_index], 0
    )


def _data_rows(data: _Data) -> list[tuple[str, str]]:
    counts = data.scan.class_counts()
    rows = [
        ("classes", str(len(data.scan.classes))),
        ("images", str(len(data.scan))),
        ("images per class", f"{counts.min()}-{counts.max()} (median {int(np.median(counts))})"),
        ("train / val", f"{len(data.train_index)} / {len(data.val_paths)}"),
    ]
    skipped = data.scan.skipped
    if skipped:
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        rows.append(("skipped", f"{sum(skipped.values())} ({detail})"))
    else:
        rows.append(("skipped", "0"))
    return rows


# Share of the free memory --cache-images may fill (the rest: model, loader processes, system),
# split between the training processes of one machine.
CACHE_MEMORY_SHARE = 0.6


def _cache_images(
    groups: list[list[Path]], keep_side: int, max_pixels: int, reporter: Reporter,
    stop: _StopRequest,
) -> list[DecodedImages]:
    """Decode every image of each group once (``--cache-images``), within the memory share."""
    available = available_memory()
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    limit = None if available is None else int(available * CACHE_MEMORY_SHARE / processes_here)
    started = time.perf_counter()
    caches: list[DecodedImages] = []
    reporter.work_start("decoding images into memory", sum(len(paths) for paths in groups))
    stop.before = "while decoding images for --cache-images, before any training"
    try:
        for paths in groups:
            left = None if limit is None else limit - sum(cache.nbytes for cache in caches)
            # A signal here stops at once (see _StopRequest): nothing is trained yet.
            caches.append(DecodedImages.build(
                paths, keep_side, max_pixels, memory_limit=left,
                on_progress=reporter.work_advance,
            ))
    finally:
        reporter.work_end()
        stop.before = "before training started"
    nbytes = sum(cache.nbytes for cache in caches)
    reporter.message(
        f"--cache-images: {sum(len(cache) for cache in caches)} images decoded once in "
        f"{time.perf_counter() - started:.1f} s, {nbytes / 2**20:.0f} MiB in memory"
    )
    return caches


def _fit_batches(
    config: TrainConfig, train_labels: np.ndarray, world_size: int, reporter: Reporter
) -> TrainConfig:
    """The batch options fitted to the training set before anything is allocated: options the
    user gave that cannot fit are refused, defaults are reduced (see ``fit_batches``)."""
    try:
        plan = fit_batches(
            np.unique(train_labels, return_counts=True)[1], config.target_batch,
            config.batch_size, config.samples_per_class, world_size,
            min_samples_per_class=2 if config.views == 1 else 1,
            given=frozenset(config.model_fields_set),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for note in plan.notes:
        reporter.message(note)
    return config.model_copy(update={
        "target_batch": plan.target_batch, "batch_size": plan.micro_batch,
        "samples_per_class": plan.samples_per_class,
    })


def _check_resumable(checkpoint: dict[str, Any], config: TrainConfig, classes: list[str]) -> None:
    current = to_plain(config)
    # An option added after the checkpoint was written had its default value then.
    defaults = to_plain(TrainConfig.model_construct())
    saved = {**defaults, **checkpoint["config"]}
    differences = [
        f"{key}: {saved.get(key)!r} -> {current[key]!r}"
        for key in sorted(current)
        if key not in RESUME_MAY_CHANGE and saved.get(key) != current[key]
    ]
    if differences:
        raise CheckpointError(
            "cannot resume: options differ from the checkpoint's (" + "; ".join(differences)
            + "); resume with the original options or start a new --save-dir"
        )
    if checkpoint["classes"] != classes:
        raise CheckpointError(
            "cannot resume: the dataset's classes differ from those the checkpoint was trained on"
        )


def _rng_payload() -> dict[str, Any]:
    payload: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        payload["cuda"] = torch.cuda.get_rng_state_all()
    return payload


def _restore_rng(payload: dict[str, Any]) -> None:
    torch.set_rng_state(payload["torch"])
    states = payload.get("cuda")
    if states and torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


def _write_metrics(save_dir: Path, history: list[EpochRecord]) -> None:
    # Rewritten whole (it is small) and atomically, so a resumed run never repeats a line.
    lines = "".join(json.dumps(asdict(record)) + "\n" for record in history)
    atomic_write_text(save_dir / METRICS, lines)


def _plot(save_dir: Path, history: list[EpochRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in history if r.loss is not None]
    validated = [r for r in history if r.val_recall_at_1 is not None]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r.epoch for r in trained], [r.loss for r in trained], marker="o")
    axes[0].set(title="SupCon loss", xlabel="epoch")
    axes[1].plot([r.epoch for r in trained], [r.lr for r in trained], marker="o", color="C1")
    axes[1].set(title="learning rate (end of epoch)", xlabel="epoch")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[2].plot(
        [r.epoch for r in validated], [r.val_recall_at_1 for r in validated],
        marker="o", color="C2",
    )
    axes[2].set(title="validation recall@1", xlabel="epoch", ylim=(0, 1.02))
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(save_dir / PLOT, lambda handle: figure.savefig(handle, format="png", dpi=100))
    plt.close(figure)


class _LoadFailures:
    """Reports each unreadable file once and keeps it out of later epochs."""

    def __init__(self, reporter: Reporter, sampler: ClassBalancedBatchSampler | None):
        self.reporter = reporter
        self.sampler = sampler
        self.seen: set[int] = set()

    def __call__(self, failure: Failed) -> None:
        if failure.index in self.seen:
            return
        self.seen.add(failure.index)
        if self.sampler is not None:
            self.sampler.exclude([failure.index])
        self.reporter.message(f"skipped unreadable image: {failure.reason}")


class _StopRequest:
    """SIGINT/SIGTERM. Before training starts (``deferring`` False) the run stops at once: there
    is nothing to save. Once it trains, the signal is noted and the loop stops at the next
    micro-batch, abandoning a step in progress, or after validation, and saves a resumable
    checkpoint first. A second Ctrl-C stops at once (the last checkpoint stays as it was).
    """

    def __init__(self):
        self.signal_number: int | None = None
        self.deferring = False
        self.before = "before training started"  # what was going on, for the message
        self._previous: dict[int, Any] = {}

    @property
    def asked(self) -> bool:
        return self.signal_number is not None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number
        if not self.deferring:
            _stopped(number, f"{self.before}; files written before stay as they were")


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides when to stop, and
    # workers dying under it would turn a clean stop into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stopped(signal_number: int | None, what: str) -> None:
    """Raise ``Interrupted``: "stopped by SIGNAL <what>" (SIGTERM when the signal is unknown)."""
    number = signal_number or signal.SIGTERM
    raise Interrupted(f"stopped by {signal.Signals(number).name} {what}", number)


def _interrupted(
    signal_number: int | None, save_dir: Path, epoch: int, step: int, abandoned: str = ""
) -> None:
    _stopped(signal_number, f"in epoch {epoch} at step {step}; {abandoned}a resumable "
             f"checkpoint is in {save_dir / LAST}: run the same command with --resume auto to "
             "continue")


def _below(recall: float | None, untrained: float | None) -> bool:
    return recall is not None and untrained is not None and recall <= untrained


def train(
    config: TrainConfig,
    reporter: Reporter | None = None,
    stop_after_epoch: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Train a SupCon embedding model as ``config`` says; returns the per-epoch history.

    SIGINT or SIGTERM ends the run after the current optimizer step with a checkpoint that
    ``--resume auto`` continues exactly, then raises ``Interrupted``. ``stop_after_epoch(epoch)``
    returning True ends the run after that epoch's checkpoint.
    """
    with _StopRequest() as stop:
        return _train(config, reporter or Reporter(), stop_after_epoch, stop)


def _train(
    config: TrainConfig,
    reporter: Reporter,
    stop_after_epoch: Callable[[int], bool] | None,
    stop: _StopRequest,
) -> TrainResult:
    device = resolve_device(config.device)
    distributed = init_distributed(device)
    if distributed.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", distributed.local_rank)
            torch.cuda.set_device(device)
        if config.target_batch % (config.batch_size * distributed.world_size):
            raise ConfigError(
                f"--target-batch ({config.target_batch}) must be a multiple of --batch-size "
                f"({config.batch_size}) x {distributed.world_size} processes"
            )
        if config.sync_bn and device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on CPU)")
        if not distributed.is_main:
            reporter = Reporter()  # one voice: rank 0 reports, writes and saves
    # Same initial weights everywhere (DDP also broadcasts them); each rank its own dropout.
    torch.manual_seed(config.seed)
    precision = resolve_precision(config.precision, device)
    workers = resolve_workers(config.workers, device)
    autocast = autocast_factory(precision, device)
    save_dir = Path(config.save_dir)

    # ---- checkpoint to resume from, if any
    checkpoint = None
    if config.resume is not None:
        resume_path = save_dir / LAST if config.resume == "auto" else Path(config.resume)
        if resume_path.is_file():
            checkpoint = load_checkpoint(resume_path)
        elif config.resume != "auto":
            raise CheckpointError(f"--resume: checkpoint not found: {resume_path}")
        else:
            reporter.message(f"no {LAST} in {save_dir} yet: starting a new run")
    elif (save_dir / LAST).exists():
        raise CheckpointError(
            f"{save_dir} already holds a run ({LAST}); pass --resume auto to continue it "
            "or choose another --save-dir"
        )

    # ---- data
    data = _load_data(config)
    classes = data.scan.classes
    train_labels = data.scan.labels[data.train_index]
    if len(np.unique(train_labels)) < 2:
        raise DataError(
            f"training needs at least two classes (found {len(np.unique(train_labels))} in "
            f"{config.data_root}): SupCon learns by contrasting classes"
        )
    if config.views == 1 and np.bincount(train_labels).max() < 2:
        raise DataError("with --views 1 some class needs two training images; use --views 2")
    config = _fit_batches(config, train_labels, distributed.world_size, reporter)
    if checkpoint is not None:
        _check_resumable(checkpoint, config, classes)

    # ---- model
    if checkpoint is not None:
        spec = ModelSpec.from_dict(checkpoint["spec"])
        model = model_from_spec(spec)
        model.load_state_dict(checkpoint["model"])
    else:
        model, spec = build_model(
            config.model,
            embedding_dim=config.embedding_dim,
            head=config.head,
            image_size=config.image_size,
            pretrained=config.pretrained,
            weights=config.weights,
        )
    reporter.table("dataset " + str(config.data_root), _data_rows(data))
    use_channels_last(model.to(device), config.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trained_model: torch.nn.Module = model
    no_sync = gather = None
    if distributed.enabled:
        if config.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        no_sync = trained_model.no_sync
        gather = gather_with_grad if config.accumulation == "cache" else None
        torch.manual_seed(config.seed + 7919 * distributed.rank)
    compile_errors: tuple[type[Exception], ...] = ()
    if config.compile:
        from torch._dynamo.exc import TorchDynamoException

        compile_errors = (TorchDynamoException,)
        # Training passes only; validation and saving use the plain module.
        trained_model = compile_model(trained_model)
        reporter.message("--compile: the first steps compile the model, which takes minutes")

    step_lr = scaled_lr(config.lr, config.target_batch, config.lr_scaling)
    resolved = to_plain(config)
    resolved.update(image_size=spec.image_size, workers=workers, resolved_device=str(device),
                    resolved_precision=precision, step_lr=step_lr)
    if distributed.enabled:
        resolved.update(processes=distributed.world_size)
    if distributed.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(save_dir / CONFIG, yaml.safe_dump(resolved, sort_keys=False))
    reporter.table("configuration", [(key, str(value)) for key, value in resolved.items()])

    # ---- loaders
    train_paths = [data.scan.paths[i] for i in data.train_index]
    # Large photos are decoded (and cached) at reduced scale, keeping twice the input size for
    # the crops.
    keep_side = 2 * spec.image_size
    train_cache = val_cache = None
    if config.cache_images:
        train_cache, val_cache = _cache_images(
            [train_paths, data.val_paths], keep_side, config.max_image_pixels, reporter, stop
        )
    train_set = MultiViewDataset(
        train_paths, train_labels,
        train_transform(config.augment, spec.image_size, spec.mean, spec.std),
        config.views, config.max_image_pixels, min_side=keep_side, cache=train_cache,
    )
    sampler = ClassBalancedBatchSampler(
        train_labels, config.target_batch, config.batch_size, config.samples_per_class,
        seed=config.seed, mix_micro_batches=config.accumulation == "cache",
        rank=distributed.rank, world_size=distributed.world_size,
    )
    loader_options: dict[str, Any] = {
        "num_workers": workers,
        "collate_fn": collate,
        "pin_memory": device.type == "cuda",
        # A private generator: the loader must not draw from the global RNG, or a resumed run
        # (fresh iterator) and an uninterrupted one (persistent workers) would diverge.
        "generator": torch.Generator().manual_seed(config.seed),
    }
    if workers > 0:
        loader_options.update(
            persistent_workers=True, prefetch_factor=4, worker_init_fn=_ignore_sigint
        )
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_options)
    val_loader = None
    if data.val_paths:
        val_set = EvalDataset(
            data.val_paths, data.val_labels,
            eval_transform(spec.image_size, spec.mean, spec.std, spec.crop_pct),
            max_pixels=config.max_image_pixels, min_side=keep_side, cache=val_cache,
        )
        val_loader = DataLoader(
            val_set, batch_size=config.batch_size * config.views, shuffle=False, **loader_options
        )
    else:
        reporter.message("no validation split (--val-fraction 0): best.pt will not be written")
    # Under DDP every rank must draw the same batches, so a rank cannot exclude a file alone:
    # unreadable files are skipped each time instead.
    train_failures = _LoadFailures(reporter, None if distributed.enabled else sampler)
    val_failures = _LoadFailures(reporter, None)

    # ---- optimisation
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = adamw(model, step_lr, config.weight_decay, config.backbone_lr_scale)
    warmup = warmup_steps(config.warmup_epochs, steps_per_epoch, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = partial(supcon_loss, temperature=config.temperature)
    backward = cached_backward if config.accumulation == "cache" else accumulated_backward

    def validate() -> float | None:
        # Rank 0 embeds the whole validation split with the plain model (no collectives), so
        # the figure is the same whatever the number of processes.
        if val_loader is None or not distributed.is_main:
            return None

        def abandon_if_asked(_: int) -> None:  # a single process may stop mid-validation
            if stop.deferring and stop.asked and not distributed.enabled:
                raise StepAbandoned

        features, labels, _ = extract_features(
            model, val_loader, device, "backbone", autocast, on_failed=val_failures,
            on_batch=abandon_if_asked, channels_last=config.channels_last,
        )
        if len(labels) == 0:
            return None
        # The same evaluator as `ascension eval`, so training and eval report the same figure.
        recall = evaluate(features, labels, ks=(1,)).report.recall_at_k[1]
        return None if math.isnan(recall) else recall

    # ---- state: fresh or resumed
    result = TrainResult(save_dir)
    start_epoch, step, nonfinite_total = 0, 0, 0
    best = None
    progress: dict[str, Any] | None = None  # of an epoch interrupted part-way
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        nonfinite_total = checkpoint.get("nonfinite_steps", 0)
        best = checkpoint.get("best_recall_at_1")
        sampler.exclude(checkpoint.get("excluded", []))
        result.history = [EpochRecord(**record) for record in checkpoint["history"]]
        progress = checkpoint.get("epoch_progress")
        _restore_rng(checkpoint["rng"])
        if distributed.enabled:  # rank 0's saved state for all would give every rank one mask
            torch.manual_seed(config.seed + 7919 * distributed.rank + 104729 * step)
        where = f"epoch {start_epoch}" if progress is None else (
            f"epoch {start_epoch + 1}, {progress['batches_done']} of {steps_per_epoch} steps in")
        reporter.message(f"resumed from {where} (step {step})")
    else:
        started = time.perf_counter()
        # The untrained model's figure, for comparison; best.pt tracks trained epochs only.
        recall = validate()
        result.history.append(EpochRecord(
            0, 0, None, optimizer.param_groups[0]["lr"], recall, None,
            time.perf_counter() - started,
        ))
        if recall is not None:
            reporter.message(f"before training: validation recall@1 {recall:.4f}")
        elif val_loader is not None:
            reporter.message(
                "validation recall cannot be measured: no validation class has two readable "
                "images (raise --val-fraction or give --val-root); best.pt will not be written"
            )

    def save(path: Path, epoch: int, progress: dict[str, Any] | None = None) -> None:
        if not distributed.is_main:
            return
        atomic_save(training_state(
            model, spec, to_plain(config), classes,
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), epoch=epoch, step=step, best_recall_at_1=best,
            nonfinite_steps=nonfinite_total, excluded=sorted(sampler.excluded),
            rng=_rng_payload(), history=[asdict(record) for record in result.history],
            epoch_progress=progress,
        ), path)

    if start_epoch >= config.epochs or (config.max_steps and step >= config.max_steps):
        reporter.message("the checkpoint has already finished this run; nothing to do")
        result.best_recall_at_1 = best
        return result

    def stop_requested() -> bool:
        stopping = stop.asked
        if distributed.enabled:  # all ranks stop at the same step, or collectives hang
            stopping = any_rank(stopping, device)
        return stopping

    def stop_mid_epoch(epoch: int, done: int, losses: list[float], images: int,
                       epoch_started: float, waited: float, abandoned: str = "") -> None:
        """Save where epoch ``epoch`` stands after ``done`` steps, then raise Interrupted."""
        save(save_dir / LAST, epoch - 1, {
            "batches_done": done, "losses": losses, "images": images,
            "seconds": time.perf_counter() - epoch_started, "waited": waited,
        })
        _interrupted(stop.signal_number, save_dir, epoch, step, abandoned)

    # A single process abandons a step when asked to stop (under DDP every rank would have to
    # agree at each micro-batch, so there the step finishes first).
    should_stop = None if distributed.enabled else (lambda: stop.asked)
    step_options: dict[str, Any] = {"no_sync": no_sync, "should_stop": should_stop}
    if gather is not None:
        step_options["gather"] = gather

    # ---- the loop
    stop.deferring = True
    micro_per_step = sampler.micro_batches_per_step
    consecutive_nonfinite = 0
    for epoch in range(start_epoch + 1, config.epochs + 1):
        trained_model.train()
        done = progress["batches_done"] if progress else 0
        sampler.set_epoch(epoch, skip=done)
        reporter.epoch_start(epoch, config.epochs, steps_per_epoch - done)
        # Figures of the steps before an interruption carry over into this epoch's record.
        epoch_started = time.perf_counter() - (progress["seconds"] if progress else 0.0)
        waited = progress["waited"] if progress else 0.0
        images_seen = progress["images"] if progress else 0
        losses = list(progress["losses"]) if progress else []
        progress = None
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        wait_started = time.perf_counter()
        for position, batch in enumerate(train_loader, start=1):
            waited += time.perf_counter() - wait_started
            for failure in batch.failed:
                train_failures(failure)
            if len(batch):
                group.append((
                    to_input(batch.images, device, config.channels_last),
                    batch.labels.to(device, non_blocking=True),
                ))
            if position % micro_per_step:
                if should_stop is not None and should_stop():
                    stop_mid_epoch(epoch, done, losses, images_seen, epoch_started, waited,
                                   "the step in progress was abandoned; ")
                wait_started = time.perf_counter()
                continue

            # One optimizer step over the whole target batch.
            optimizer.zero_grad(set_to_none=True)
            try:
                loss = (backward(trained_model, group, loss_fn, autocast, scaler.scale,
                                 **step_options) if group else None)
            except StepAbandoned:
                stop_mid_epoch(epoch, done, losses, images_seen, epoch_started, waited,
                               "the step in progress was abandoned; ")
            except compile_errors as exc:
                raise TrainingError(
                    f"--compile failed: {first_line(exc)}; train without --compile"
                ) from None
            step_images = sum(labels.numel() for _, labels in group) * distributed.world_size
            group = []
            if loss is None or not torch.isfinite(loss):
                nonfinite_total += loss is not None
                consecutive_nonfinite += loss is not None
                if consecutive_nonfinite >= config.max_nonfinite:
                    raise TrainingError(
                        f"the loss was not finite for {consecutive_nonfinite} steps in a row "
                        f"(epoch {epoch}, step {step}); lower --lr, use --precision fp32 or "
                        "bf16, or set --grad-clip"
                    )
                optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():
                    # A skipped step still advances the schedule, so it stays tied to epochs.
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    scheduler.step()
            else:
                consecutive_nonfinite = 0
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss))
                scheduler.step()
            step += 1
            images_seen += step_images
            elapsed = time.perf_counter() - epoch_started
            reporter.step(
                losses[-1] if losses else float("nan"),
                scheduler.get_last_lr()[0],
                images_seen / elapsed if elapsed > 0 else 0.0,
            )
            done += 1
            if stop_requested() and done < steps_per_epoch:
                stop_mid_epoch(epoch, done, losses, images_seen, epoch_started, waited)
            if config.max_steps is not None and step >= config.max_steps:
                break
            wait_started = time.perf_counter()

        train_seconds = time.perf_counter() - epoch_started
        try:
            recall = validate()
        except StepAbandoned:  # resumed, the epoch has no steps left and validates first
            stop_mid_epoch(epoch, done, losses, images_seen, epoch_started, waited,
                           "validation was abandoned; ")
        improved = recall is not None and (best is None or recall > best)
        if improved:
            best = recall
        record = EpochRecord(
            epoch=epoch,
            step=step,
            loss=float(np.mean(losses)) if losses else None,
            lr=scheduler.get_last_lr()[0],
            val_recall_at_1=recall,
            images_per_second=images_seen / train_seconds if train_seconds > 0 else None,
            seconds=time.perf_counter() - epoch_started,
            data_wait_fraction=waited / train_seconds if train_seconds > 0 else None,
            nonfinite_steps=nonfinite_total,
            best=improved,
            below_untrained=_below(recall, result.untrained_recall_at_1),
        )
        result.history.append(record)
        save(save_dir / LAST, epoch)
        if improved:
            save(save_dir / BEST, epoch)
        if distributed.is_main:
            _write_metrics(save_dir, result.history)
            _plot(save_dir, result.history)
        reporter.epoch_end(record)
        if stop_requested() and epoch < config.epochs:
            _interrupted(stop.signal_number, save_dir, epoch + 1, step)
        if config.max_steps is not None and step >= config.max_steps:
            reporter.message(f"reached --max-steps {config.max_steps}")
            result.stopped_early = epoch < config.epochs
            break
        if stop_after_epoch is not None and stop_after_epoch(epoch):
            result.stopped_early = epoch < config.epochs
            break

    result.best_recall_at_1 = best
    if distributed.enabled:
        torch.distributed.barrier()  # the others wait while rank 0 validates and saves
    return result

