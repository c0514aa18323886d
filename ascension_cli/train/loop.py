"""The SupCon training loop: set-up, then epochs of optimizer steps, validation and checkpoints.

Read it like nanoGPT's train.py. ``Trainer.__init__`` builds everything a run needs, once (data,
model, loaders, optimizer, the step's fixed arguments); ``run`` loops over epochs; ``run_epoch``
is the inner loop, every step in plain sight; ``validate`` and ``save`` do one job each. Progress
goes to a ``Reporter`` (the CLI draws it with rich; tests collect it), never to a console.
"""

from __future__ import annotations

import math
import os
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

from ascension_cli.atomic import atomic_write_text
from ascension_cli.config import TrainConfig, resume_may_change, to_plain
from ascension_cli.data.augment import eval_transform, train_transform
from ascension_cli.data.cache import DecodedImages, available_memory
from ascension_cli.data.dataset import EvalDataset, Failed, MultiViewDataset, collate
from ascension_cli.data.folder import FolderScan, stratified_split
from ascension_cli.data.manifest import scan_source
from ascension_cli.data.sampler import ClassBalancedBatchSampler, fit_batches
from ascension_cli.data.shards import ShardSet, is_shards, open_shards
from ascension_cli.data.stream import ShardTrainStream, stream_count
from ascension_cli.embed.inference import extract_features
from ascension_cli.errors import CheckpointError, ConfigError, DataError, TrainingError, first_line
from ascension_cli.losses import supcon_loss
from ascension_cli.model.backbone import ModelSpec, build_model, model_from_spec
from ascension_cli.model.checkpoint import atomic_save, load_checkpoint, training_state
from ascension_cli.retrieval.evaluate import evaluate
from ascension_cli.runtime import (
    autocast_factory,
    compile_model,
    init_distributed,
    resolve_device,
    resolve_precision,
    resolve_workers,
    to_input,
    use_channels_last,
)
from ascension_cli.train.distributed import any_rank, gather_with_grad, rank_seed
from ascension_cli.train.gradcache import StepAbandoned, accumulated_backward, cached_backward
from ascension_cli.train.logbook import (
    METRICS,
    PLOT,
    EpochRecord,
    TrainResult,
    below,
    data_rows,
    plot,
    write_metrics,
)
from ascension_cli.train.schedule import adamw, scaled_lr, warmup_cosine, warmup_steps
from ascension_cli.train.stopping import StopRequest, ignore_sigint, interrupted
from ascension_cli.train.trackers import Tracker, Trackers, open_trackers, require

LAST = "last.pt"
BEST = "best.pt"
CONFIG = "config.yaml"


@dataclass
class EpochProgress:
    """Where an interrupted epoch stands; a resume carries on from exactly here."""

    batches_done: int = 0
    losses: list[float] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    waited: float = 0.0  # seconds spent waiting for data


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
class _Data:
    scan: FolderScan
    train_index: np.ndarray
    val_paths: list[Path]
    val_labels: np.ndarray
    val_skipped: int
    shards: ShardSet | None = None  # training streams from these; scan holds classes and labels


def _load_shards(config: TrainConfig) -> _Data:
    """Shards to stream: their classes and per-class counts stand in for a scan (no paths);
    validation comes from --val-root only (a stream cannot hold images out)."""
    if config.cache_images:
        raise ConfigError("--cache-images applies to folders and manifests, not shards (they "
                          "are streamed)")
    if "val_fraction" in config.model_fields_set:
        raise ConfigError("shards are streamed, so no images can be held out of them: give "
                          "--val-root (a folder or manifest) instead of --val-fraction")
    shards = open_shards(config.data_root)
    labels = np.repeat(np.arange(len(shards.classes)), shards.class_counts)
    scan = FolderScan(Path(str(config.data_root)), shards.classes, [], labels)
    data = _Data(scan, np.arange(len(labels)), [], np.zeros(0, np.int64), 0, shards)
    if config.val_root is not None:
        val_scan = _validation_scan(config.val_root, shards.classes)
        data.val_paths, data.val_labels = val_scan.paths, val_scan.labels
        data.val_skipped = sum(val_scan.skipped.values())
    return data


def _validation_scan(source, classes: list[str]) -> FolderScan:
    """--val-root: a folder, or a manifest (its validation rows when it has a split column)."""
    scan = scan_source(source, classes=classes)
    if scan.splits is None:
        return scan
    chosen = scan.subset(scan.splits == "validation")
    if not len(chosen):
        raise DataError(f"--val-root {source} has a split column but no validation rows")
    return chosen


def _load_data(config: TrainConfig) -> _Data:
    """The training images and the validation images: a manifest's split column decides where
    it has one (its test rows are never read), else --val-root or a seeded --val-fraction."""
    if is_shards(config.data_root):
        return _load_shards(config)
    scan = scan_source(config.data_root)
    train = np.ones(len(scan), dtype=bool) if scan.splits is None else scan.splits == "train"
    if not train.any():
        raise DataError(f"{config.data_root} has no rows of split 'train' to train on")
    if config.val_root is not None:
        val_scan = _validation_scan(config.val_root, scan.classes)
        return _Data(scan, np.flatnonzero(train), val_scan.paths, val_scan.labels,
                     sum(val_scan.skipped.values()))
    named = np.zeros(len(scan), bool) if scan.splits is None else scan.splits == "validation"
    if named.any():
        if "val_fraction" in config.model_fields_set:
            raise ConfigError(f"{config.data_root} names its validation rows (split column): "
                              "drop --val-fraction")
        val_index = np.flatnonzero(named)
        return _Data(scan, np.flatnonzero(train), [scan.paths[i] for i in val_index],
                     scan.labels[val_index], 0)
    rows = np.flatnonzero(train)
    train_index, val_index = stratified_split(scan.labels[rows], config.val_fraction, config.seed)
    return _Data(scan, rows[train_index], [scan.paths[i] for i in rows[val_index]],
                 scan.labels[rows[val_index]], 0)


# Share of the free memory --cache-images may fill (the rest: model, loader processes, system),
# split between the training processes of one machine.
CACHE_MEMORY_SHARE = 0.6


def _cache_images(
    groups: list[list[Path]], keep_side: int, max_pixels: int, reporter: Reporter,
    stop: StopRequest,
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
            # A signal here stops at once (see StopRequest): nothing is trained yet.
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
    may_change = resume_may_change()
    differences = [
        f"{key}: {saved.get(key)!r} -> {current[key]!r}"
        for key in sorted(current)
        if key not in may_change and saved.get(key) != current[key]
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


def rng_payload() -> dict[str, Any]:
    payload: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        payload["cuda"] = torch.cuda.get_rng_state_all()
    return payload


def restore_rng(payload: dict[str, Any]) -> None:
    torch.set_rng_state(payload["torch"])
    states = payload.get("cuda")
    if states and torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


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


def train(
    config: TrainConfig,
    reporter: Reporter | None = None,
    stop_after_epoch: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Train a SupCon embedding model as ``config`` says; returns the per-epoch history.

    SIGINT or SIGTERM ends the run at the next micro-batch with a checkpoint that
    ``--resume auto`` continues exactly, then raises ``Interrupted``. ``stop_after_epoch(epoch)``
    returning True ends the run after that epoch's checkpoint.
    """
    with StopRequest() as stop:
        return Trainer(config, reporter or Reporter(), stop).run(stop_after_epoch)


class Trainer:
    """One training run: everything built once in ``__init__``, then ``run``."""

    def __init__(self, config: TrainConfig, reporter: Reporter, stop: StopRequest):
        self.stop = stop
        require(config.tracker)  # a missing extra ends the run before any work
        self.trackers: Tracker = Tracker()
        self.device = resolve_device(config.device)
        self.distributed = init_distributed(self.device)
        if self.distributed.enabled:
            self._join_processes(config)
            if not self.distributed.is_main:
                reporter = Reporter()  # one voice: rank 0 reports, writes and saves
        self.reporter = reporter
        # Same initial weights everywhere (DDP also broadcasts them); each rank its own dropout.
        torch.manual_seed(config.seed)
        self.precision = resolve_precision(config.precision, self.device)
        self.workers = resolve_workers(config.workers, self.device)
        self.autocast = autocast_factory(self.precision, self.device)
        self.save_dir = Path(config.save_dir)
        self.checkpoint = self._checkpoint_to_resume(config)
        self.data = _load_data(config)
        self.config = config = self._checked_against_data(config)
        self._build_model()
        self._build_loaders()
        self._build_optimisation()
        self.result = TrainResult(self.save_dir)
        self.epoch, self.step_count, self.best = 0, 0, None  # epoch: the last one finished
        self.nonfinite_total = self.consecutive_nonfinite = 0
        self.progress: EpochProgress | None = None  # of an epoch interrupted part-way

    # ---- set-up
    def _join_processes(self, config: TrainConfig) -> None:
        world = self.distributed.world_size
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.distributed.local_rank)
            torch.cuda.set_device(self.device)
        if config.target_batch % (config.batch_size * world):
            raise ConfigError(
                f"--target-batch ({config.target_batch}) must be a multiple of --batch-size "
                f"({config.batch_size}) x {world} processes"
            )
        if config.sync_bn and self.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on CPU)")

    def _checkpoint_to_resume(self, config: TrainConfig) -> dict[str, Any] | None:
        last = self.save_dir / LAST
        if config.resume is None:
            if last.exists():
                raise CheckpointError(
                    f"{self.save_dir} already holds a run ({LAST}); pass --resume auto to "
                    "continue it or choose another --save-dir"
                )
            return None
        path = last if config.resume == "auto" else Path(config.resume)
        if path.is_file():
            return load_checkpoint(path)
        if config.resume != "auto":
            raise CheckpointError(f"--resume: checkpoint not found: {path}")
        self.reporter.message(f"no {LAST} in {self.save_dir} yet: starting a new run")
        return None

    def _checked_against_data(self, config: TrainConfig) -> TrainConfig:
        labels = self.data.scan.labels[self.data.train_index]
        classes = len(np.unique(labels))
        if classes < 2:
            raise DataError(
                f"training needs at least two classes (found {classes} in "
                f"{config.data_root}): SupCon learns by contrasting classes"
            )
        if config.views == 1 and np.bincount(labels).max() < 2:
            raise DataError("with --views 1 some class needs two training images; use --views 2")
        config = _fit_batches(config, labels, self.distributed.world_size, self.reporter)
        if self.checkpoint is not None:
            _check_resumable(self.checkpoint, config, self.data.scan.classes)
        return config

    def _build_model(self) -> None:
        config, checkpoint = self.config, self.checkpoint
        if checkpoint is not None:
            self.spec = ModelSpec.from_dict(checkpoint["spec"])
            self.model = model_from_spec(self.spec)
            self.model.load_state_dict(checkpoint["model"])
        else:
            self.model, self.spec = build_model(
                config.model, embedding_dim=config.embedding_dim, head=config.head,
                image_size=config.image_size, pretrained=config.pretrained,
                weights=config.weights,
            )
        self.reporter.table("dataset " + str(config.data_root), data_rows(
            self.data.scan, len(self.data.train_index), len(self.data.val_paths)))
        if self.data.scan.skipped_lines:
            self.reporter.message(f"{config.data_root}: {self.data.scan.skip_summary()}")
        use_channels_last(self.model.to(self.device), config.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.trained_model: torch.nn.Module = self.model
        no_sync = gather = None
        if self.distributed.enabled:
            if config.sync_bn:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.trained_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            no_sync = self.trained_model.no_sync
            gather = gather_with_grad if config.accumulation == "cache" else None
            torch.manual_seed(rank_seed(config.seed, self.distributed.rank))
        self.compile_errors: tuple[type[Exception], ...] = ()
        if config.compile:
            from torch._dynamo.exc import TorchDynamoException

            self.compile_errors = (TorchDynamoException,)
            # Training passes only; validation and saving use the plain module.
            self.trained_model = compile_model(self.trained_model)
            self.reporter.message("--compile: the first steps compile the model, which takes "
                                  "minutes")
        # A single process abandons a step when asked to stop (under DDP every rank would have
        # to agree at each micro-batch, so there the step finishes first).
        self.should_stop = None if self.distributed.enabled else (lambda: self.stop.asked)
        self.step_options: dict[str, Any] = {"no_sync": no_sync, "should_stop": self.should_stop}
        if gather is not None:
            self.step_options["gather"] = gather
        self._write_config()

    def _write_config(self) -> None:
        config = self.config
        self.step_lr = scaled_lr(config.lr, config.target_batch, config.lr_scaling)
        self.resolved = resolved = to_plain(config)
        resolved.update(image_size=self.spec.image_size, workers=self.workers,
                        resolved_device=str(self.device), resolved_precision=self.precision,
                        step_lr=self.step_lr)
        if self.distributed.enabled:
            resolved.update(processes=self.distributed.world_size)
        if self.distributed.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.save_dir / CONFIG, yaml.safe_dump(resolved, sort_keys=False))
        self.reporter.table("configuration", [(key, str(value)) for key, value in resolved.items()])

    def _build_loaders(self) -> None:
        if self.data.shards is not None:
            self._build_stream_loaders()
            return
        config, data, spec = self.config, self.data, self.spec
        train_paths = [data.scan.paths[i] for i in data.train_index]
        train_labels = data.scan.labels[data.train_index]
        # Large photos are decoded (and cached) at reduced scale, keeping twice the input size
        # for the crops.
        keep_side = 2 * spec.image_size
        train_cache = val_cache = None
        if config.cache_images:
            train_cache, val_cache = _cache_images(
                [train_paths, data.val_paths], keep_side, config.max_image_pixels, self.reporter,
                self.stop,
            )
        train_set = MultiViewDataset(
            train_paths, train_labels,
            train_transform(config.augment, spec.image_size, spec.mean, spec.std),
            config.views, config.max_image_pixels, min_side=keep_side, cache=train_cache,
        )
        self.sampler = ClassBalancedBatchSampler(
            train_labels, config.target_batch, config.batch_size, config.samples_per_class,
            seed=config.seed, mix_micro_batches=config.accumulation == "cache",
            rank=self.distributed.rank, world_size=self.distributed.world_size,
        )
        options: dict[str, Any] = {
            "num_workers": self.workers, "collate_fn": collate,
            "pin_memory": self.device.type == "cuda",
            # A private generator: the loader must not draw from the global RNG, or a resumed
            # run (fresh iterator) and an uninterrupted one (persistent workers) would diverge.
            "generator": torch.Generator().manual_seed(config.seed),
        }
        if self.workers > 0:
            options.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=ignore_sigint)
        self.train_loader = DataLoader(train_set, batch_sampler=self.sampler, **options)
        self._build_val_loader(options, val_cache)
        # Under DDP every rank must draw the same batches, so a rank cannot exclude a file
        # alone: unreadable files are skipped each time instead.
        self.train_failures = _LoadFailures(
            self.reporter, None if self.distributed.enabled else self.sampler)
        self.val_failures = _LoadFailures(self.reporter, None)

    def _build_stream_loaders(self) -> None:
        """Training streamed from shards (see ``data/stream.py``); validation as for folders."""
        config, data, spec = self.config, self.data, self.spec
        world = self.distributed.world_size
        try:
            streams = stream_count(data.shards, world, self.workers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.workers > streams:
            self.reporter.message(f"{len(data.shards.urls)} shards feed {streams} loader "
                                  f"process(es) per training process, not {self.workers}")
        self.sampler = ShardTrainStream(
            data.shards, train_transform(config.augment, spec.image_size, spec.mean, spec.std),
            config.views, config.batch_size, config.target_batch // (config.batch_size * world),
            config.samples_per_class, max(1, data.shards.count // config.target_batch),
            config.shuffle_buffer, config.seed, self.distributed.rank, world,
            config.max_image_pixels, min_side=2 * spec.image_size,
            mix=config.accumulation == "cache",
        )
        workers = streams if self.workers > 0 else 0
        # Not persistent: each epoch's iterator carries the epoch (and skip) to the workers.
        options: dict[str, Any] = {"num_workers": workers,
                                   "pin_memory": self.device.type == "cuda"}
        if workers > 0:
            options.update(prefetch_factor=4, worker_init_fn=ignore_sigint)
        self.train_loader = DataLoader(self.sampler, batch_size=None, **options)
        self._build_val_loader({**options, "collate_fn": collate}, None)
        self.train_failures = _LoadFailures(self.reporter, None)
        self.val_failures = _LoadFailures(self.reporter, None)

    def _build_val_loader(self, options: dict[str, Any], val_cache) -> None:
        config, data, spec = self.config, self.data, self.spec
        keep_side = 2 * spec.image_size
        self.val_loader = None
        if data.val_paths:
            val_set = EvalDataset(
                data.val_paths, data.val_labels,
                eval_transform(spec.image_size, spec.mean, spec.std, spec.crop_pct),
                max_pixels=config.max_image_pixels, min_side=keep_side, cache=val_cache,
            )
            self.val_loader = DataLoader(val_set, batch_size=config.batch_size * config.views,
                                         shuffle=False, **options)
        elif data.shards is not None:
            self.reporter.message("no validation images (shards hold none out; give --val-root):"
                                  " best.pt will not be written")
        else:
            self.reporter.message("no validation split (--val-fraction 0): best.pt will not be "
                                  "written")

    def _build_optimisation(self) -> None:
        config = self.config
        self.steps_per_epoch = self.sampler.batches_per_epoch
        total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        self.optimizer = adamw(self.model, self.step_lr, config.weight_decay,
                               config.backbone_lr_scale)
        warmup = warmup_steps(config.warmup_epochs, self.steps_per_epoch, total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total_steps, warmup))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.loss_fn = partial(supcon_loss, temperature=config.temperature)
        self.backward = (cached_backward if config.accumulation == "cache"
                         else accumulated_backward)

    # ---- state: fresh or resumed
    def _resume(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch, self.step_count = checkpoint["epoch"], checkpoint["step"]
        self.nonfinite_total = checkpoint.get("nonfinite_steps", 0)
        self.best = checkpoint.get("best_recall_at_1")
        self.sampler.exclude(checkpoint.get("excluded", []))
        self.result.history = [EpochRecord(**record) for record in checkpoint["history"]]
        saved = checkpoint.get("epoch_progress")
        self.progress = None if saved is None else EpochProgress(**saved)
        restore_rng(checkpoint["rng"])
        if self.distributed.enabled:  # rank 0's saved state for all would give one mask
            torch.manual_seed(rank_seed(self.config.seed, self.distributed.rank,
                                        self.step_count))
        where = f"epoch {self.epoch}" if self.progress is None else (
            f"epoch {self.epoch + 1}, {self.progress.batches_done} of {self.steps_per_epoch} "
            "steps in")
        self.reporter.message(f"resumed from {where} (step {self.step_count})")

    def _measure_untrained(self) -> None:
        started = time.perf_counter()
        # The untrained model's figure, for comparison; best.pt tracks trained epochs only.
        recall = self.validate()
        self.result.history.append(EpochRecord(
            0, 0, None, self.optimizer.param_groups[0]["lr"], recall, None,
            time.perf_counter() - started,
        ))
        if recall is not None:
            self.reporter.message(f"before training: validation recall@1 {recall:.4f}")
        elif self.val_loader is not None:
            self.reporter.message(
                "validation recall cannot be measured: no validation class has two readable "
                "images (raise --val-fraction or give --val-root); best.pt will not be written"
            )

    # ---- the run
    def run(self, stop_after_epoch: Callable[[int], bool] | None = None) -> TrainResult:
        config, result = self.config, self.result
        if self.checkpoint is not None:
            self._resume(self.checkpoint)
        else:
            self._measure_untrained()
        finished = config.max_steps is not None and self.step_count >= config.max_steps
        if self.epoch >= config.epochs or finished:
            self.reporter.message("the checkpoint has already finished this run; nothing to do")
            result.best_recall_at_1 = self.best
            return result
        self.trackers = (open_trackers(config.tracker, self.save_dir, self.resolved,
                                       config.tracking_uri, resume=self.checkpoint is not None)
                         if self.distributed.is_main else Trackers([]))
        if self.checkpoint is None:
            self.trackers.epoch(result.history[0])  # the untrained model
        self.stop.deferring = True
        finished = False
        try:
            self._epochs(stop_after_epoch)
            finished = True
        finally:
            best = self.save_dir / BEST
            self.trackers.close(finished, [self.save_dir / name for name in (
                PLOT, METRICS, CONFIG)] + [best if best.is_file() else self.save_dir / LAST])
        result.best_recall_at_1 = self.best
        if self.distributed.enabled:
            torch.distributed.barrier()  # the others wait while rank 0 validates and saves
        return result

    def _epochs(self, stop_after_epoch: Callable[[int], bool] | None) -> None:
        config, result = self.config, self.result
        for epoch in range(self.epoch + 1, config.epochs + 1):
            record = self.run_epoch(epoch)
            self.end_epoch(record)
            self.epoch = epoch
            if self.stop_requested() and epoch < config.epochs:
                interrupted(self.stop.signal_number, self.save_dir / LAST, epoch + 1,
                            self.step_count)
            if config.max_steps is not None and self.step_count >= config.max_steps:
                self.reporter.message(f"reached --max-steps {config.max_steps}")
                result.stopped_early = epoch < config.epochs
                break
            if stop_after_epoch is not None and stop_after_epoch(epoch):
                result.stopped_early = epoch < config.epochs
                break

    def run_epoch(self, epoch: int) -> EpochRecord:
        """The inner loop: gather each target batch's micro-batches, step, report."""
        config, device = self.config, self.device
        progress, self.progress = self.progress or EpochProgress(), None
        self.trained_model.train()
        self.sampler.set_epoch(epoch, skip=progress.batches_done)
        self.reporter.epoch_start(epoch, config.epochs,
                                  self.steps_per_epoch - progress.batches_done)
        # Figures of the steps before an interruption carry over into this epoch's record.
        started = time.perf_counter() - progress.seconds
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        micro_per_step = self.sampler.micro_batches_per_step
        wait_started = time.perf_counter()
        for position, batch in enumerate(self.train_loader, start=1):
            progress.waited += time.perf_counter() - wait_started
            for failure in batch.failed:
                self.train_failures(failure)
            if len(batch):
                group.append((to_input(batch.images, device, config.channels_last),
                              batch.labels.to(device, non_blocking=True)))
            if position % micro_per_step:  # the target batch is not complete yet
                if self.should_stop is not None and self.should_stop():
                    self.stop_mid_epoch(epoch, progress, started, "the step in progress was "
                                        "abandoned; ")
                wait_started = time.perf_counter()
                continue
            try:
                loss = self.optimizer_step(group)
            except StepAbandoned:
                self.stop_mid_epoch(epoch, progress, started,
                                    "the step in progress was abandoned; ")
            progress.images += (sum(labels.numel() for _, labels in group)
                                * self.distributed.world_size)
            group = []
            if loss is not None:
                progress.losses.append(loss)
            elapsed = time.perf_counter() - started
            lr, speed = self.scheduler.get_last_lr()[0], (
                progress.images / elapsed if elapsed > 0 else 0.0)
            self.reporter.step(progress.losses[-1] if progress.losses else float("nan"), lr,
                               speed)
            self.trackers.step(self.step_count, loss, lr, speed)
            progress.batches_done += 1
            if self.stop_requested() and progress.batches_done < self.steps_per_epoch:
                self.stop_mid_epoch(epoch, progress, started)
            if config.max_steps is not None and self.step_count >= config.max_steps:
                break
            wait_started = time.perf_counter()
        return self.epoch_record(epoch, progress, started)

    def optimizer_step(self, group: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
        """One optimizer step over a target batch; its loss, or None when it was skipped
        (empty, or a non-finite loss: counted, and too many in a row stop the run)."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss = (self.backward(self.trained_model, group, self.loss_fn, self.autocast,
                                  self.scaler.scale, **self.step_options) if group else None)
        except self.compile_errors as exc:
            raise TrainingError(
                f"--compile failed: {first_line(exc)}; train without --compile") from None
        self.step_count += 1
        if loss is None or not torch.isfinite(loss):
            self._skip_step(loss is not None)
            return None
        self.consecutive_nonfinite = 0
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss)

    def _skip_step(self, nonfinite: bool) -> None:
        self.nonfinite_total += nonfinite
        self.consecutive_nonfinite += nonfinite
        if self.consecutive_nonfinite >= self.config.max_nonfinite:
            raise TrainingError(
                f"the loss was not finite for {self.consecutive_nonfinite} steps in a row "
                f"(epoch {self.epoch + 1}, step {self.step_count - 1}); lower --lr, use "
                "--precision fp32 or bf16, or set --grad-clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped step still advances the schedule, so it stays tied to epochs.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.scheduler.step()

    def epoch_record(self, epoch: int, progress: EpochProgress, started: float) -> EpochRecord:
        """Validate, then the epoch's figures."""
        train_seconds = time.perf_counter() - started
        try:
            recall = self.validate()
        except StepAbandoned:  # resumed, the epoch has no steps left and validates first
            self.stop_mid_epoch(epoch, progress, started, "validation was abandoned; ")
        improved = recall is not None and (self.best is None or recall > self.best)
        if improved:
            self.best = recall
        return EpochRecord(
            epoch=epoch, step=self.step_count,
            loss=float(np.mean(progress.losses)) if progress.losses else None,
            lr=self.scheduler.get_last_lr()[0], val_recall_at_1=recall,
            images_per_second=progress.images / train_seconds if train_seconds > 0 else None,
            seconds=time.perf_counter() - started,
            data_wait_fraction=progress.waited / train_seconds if train_seconds > 0 else None,
            nonfinite_steps=self.nonfinite_total, best=improved,
            below_untrained=below(recall, self.result.untrained_recall_at_1),
        )

    def end_epoch(self, record: EpochRecord) -> None:
        """Save last.pt (and best.pt), rewrite metrics.jsonl and the plot, report."""
        self.result.history.append(record)
        self.save(self.save_dir / LAST, record.epoch)
        if record.best:
            self.save(self.save_dir / BEST, record.epoch)
        if self.distributed.is_main:
            write_metrics(self.save_dir, self.result.history)
            plot(self.save_dir, self.result.history)
        self.trackers.epoch(record)
        self.reporter.epoch_end(record)

    def validate(self) -> float | None:
        """Validation recall@1. Rank 0 embeds the whole validation split with the plain model
        (no collectives), so the figure is the same whatever the number of processes."""
        if self.val_loader is None or not self.distributed.is_main:
            return None

        def abandon_if_asked(_: int) -> None:  # as a step is (a single process only)
            if self.stop.deferring and self.should_stop is not None and self.should_stop():
                raise StepAbandoned

        features, labels, _ = extract_features(
            self.model, self.val_loader, self.device, "backbone", self.autocast,
            on_failed=self.val_failures, on_batch=abandon_if_asked,
            channels_last=self.config.channels_last,
        )
        if len(labels) == 0:
            return None
        # The same evaluator as `ascension eval`, so training and eval report the same figure.
        recall = evaluate(features, labels, ks=(1,)).report.recall_at_k[1]
        return None if math.isnan(recall) else recall

    # ---- saving and stopping
    def save(self, path: Path, epoch: int, progress: EpochProgress | None = None) -> None:
        if not self.distributed.is_main:
            return
        atomic_save(training_state(
            self.model, self.spec, to_plain(self.config), self.data.scan.classes,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), epoch=epoch, step=self.step_count,
            best_recall_at_1=self.best, nonfinite_steps=self.nonfinite_total,
            excluded=sorted(self.sampler.excluded), rng=rng_payload(),
            history=[asdict(record) for record in self.result.history],
            epoch_progress=None if progress is None else asdict(progress),
        ), path)

    def stop_requested(self) -> bool:
        stopping = self.stop.asked
        if self.distributed.enabled:  # all ranks stop at the same step, or collectives hang
            stopping = any_rank(stopping, self.device)
        return stopping

    def stop_mid_epoch(self, epoch: int, progress: EpochProgress, started: float,
                       abandoned: str = "") -> None:
        """Save where epoch ``epoch`` stands, then raise Interrupted."""
        progress.seconds = time.perf_counter() - started
        self.save(self.save_dir / LAST, epoch - 1, progress)
        interrupted(self.stop.signal_number, self.save_dir / LAST, epoch, self.step_count,
                    abandoned)
