"""The SupCon training loop: epochs of optimizer steps, validation and checkpoints.

Read it like nanoGPT's train.py, after ``build.py`` has built the run. ``train`` builds a
``Run`` and hands it to a ``Trainer`` with a ``TrainState``; ``Trainer.run`` loops over epochs;
``run_epoch`` is the inner loop, every step in plain sight; ``validate`` and ``save`` do one job
each. A checkpoint holds ``Trainer.state_dict()``, and a resume loads it with
``load_state_dict``: the one pair of functions that says what a run's state is.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from ascension_cli.config import TrainConfig, to_plain
from ascension_cli.errors import TrainingError, Wording, first_line
from ascension_cli.formats import BEST_CHECKPOINT, LAST_CHECKPOINT, RUN_CONFIG
from ascension_cli.model.backbone import training_mode
from ascension_cli.model.checkpoint import atomic_save, training_state
from ascension_cli.runtime import to_input
from ascension_cli.train.average import applied
from ascension_cli.train.build import Run, build_run, resumed_path
from ascension_cli.train.distributed import any_rank, rank_seed
from ascension_cli.train.gradcache import StepAbandoned
from ascension_cli.train.logbook import (
    METRICS,
    PLOT,
    EpochRecord,
    TrainResult,
    below,
    plot,
    write_metrics,
)
from ascension_cli.train.reporter import Reporter
from ascension_cli.train.state import EpochProgress, TrainState, load_parts, load_state
from ascension_cli.train.stopping import StopRequest, interrupted
from ascension_cli.train.trackers import Tracker, Trackers, open_trackers, require
from ascension_cli.train.validation import (
    NOT_MEASURABLE,
    gallery_figures,
    measure_best,
    start_text,
    validation_figures,
)

__all__ = ["EpochProgress", "EpochRecord", "Reporter", "Trainer", "TrainResult", "train"]


def train(
    config: TrainConfig,
    reporter: Reporter | None = None,
    stop_after_epoch: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Train a SupCon embedding model as ``config`` says; returns the per-epoch history.

    SIGINT or SIGTERM ends the run at the next micro-batch with a checkpoint that
    ``resume="auto"`` continues exactly, then raises ``Interrupted``. ``stop_after_epoch(epoch)``
    returning True ends the run after that epoch's checkpoint.
    """
    require(config.tracker)  # a missing extra ends the run before any work
    with StopRequest() as stop:
        run = build_run(config, reporter or Reporter(), stop)
        return Trainer(run, stop).run(stop_after_epoch)


class Trainer:
    """Runs a built ``Run``: epochs, steps, validation, checkpoints. Its only changing data is
    ``state`` (a ``TrainState``) and the run's optimizer, scheduler, scaler and sampler."""

    def __init__(self, run: Run, stop: StopRequest):
        self.run_parts, self.stop = run, stop
        self.config, self.reporter = run.config, run.reporter
        self.state = TrainState()
        self.result = TrainResult(run.save_dir)
        self.result.history = self.state.history
        self.trackers: Tracker = Tracker()

    # ---- the run's state: what a checkpoint saves and a resume loads
    def state_dict(self, progress: EpochProgress | None = None) -> dict[str, Any]:
        return {**self.state.state_dict(progress), **{
            key: part.state_dict() for key, part in self.run_parts.stateful().items()}}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        source = resumed_path(self.config, self.run_parts.save_dir)
        load_parts(self.run_parts.stateful(), payload, source)
        load_state(self.state, payload, source)
        self.result.history = self.state.history
        distributed = self.run_parts.machine.distributed
        if distributed.enabled:  # rank 0's saved RNG for all would give one dropout mask
            torch.manual_seed(rank_seed(self.config.seed, distributed.rank, self.state.step))

    def _resume(self) -> None:
        self.load_state_dict(self.run_parts.checkpoint)
        state, steps = self.state, self.run_parts.steps_per_epoch
        where = f"epoch {state.epoch}" if state.progress is None else (
            f"epoch {state.epoch + 1}, {state.progress.batches_done} of {steps} steps in")
        self.reporter.message(f"resumed from {where} (step {state.step})")

    def _measure_untrained(self) -> None:
        # The starting weights are a candidate like any epoch (best.pt until one is better).
        started = time.perf_counter()
        figures = validation_figures(self.run_parts, self.stop)
        recall = figures.get("val_recall_at_1")
        if recall is not None:
            figures |= gallery_figures(self.run_parts, self.stop)
        self.state.history.append(EpochRecord(
            0, 0, None, self.run_parts.opt.optimizer.param_groups[0]["lr"], images_per_second=None,
            seconds=time.perf_counter() - started, best=recall is not None, **figures))
        self.result.history = self.state.history
        if recall is not None:
            self.state.best = recall
            self.save(self.run_parts.save_dir / BEST_CHECKPOINT, 0)
            self.reporter.message(start_text(self.run_parts, figures))
        elif self.run_parts.loaders.val is not None:
            self.reporter.message(NOT_MEASURABLE)

    # ---- the run
    def run(self, stop_after_epoch: Callable[[int], bool] | None = None) -> TrainResult:
        config, result, run = self.config, self.result, self.run_parts
        if run.checkpoint is not None:
            self._resume()
        else:
            self._measure_untrained()
        if self.state.epoch >= config.epochs or reached_max_steps(self.config, self.state):
            self.reporter.message("the checkpoint has already finished this run; nothing to do")
            result.best_recall_at_1 = self.state.best
            return result
        self.trackers = (open_trackers(config.tracker, run.save_dir, run.resolved,
                                       config.tracking_uri, resume=run.checkpoint is not None)
                         if run.machine.distributed.is_main else Trackers([]))
        if run.checkpoint is None:
            self.trackers.epoch(self.state.history[0])  # the untrained model
        self.stop.deferring = True
        finished = False
        try:
            self._epochs(stop_after_epoch)
            finished = True
            measure_best(self.run_parts, self.state.history, self.stop)
        finally:
            self.trackers.close(finished, [run.save_dir / name for name in (
                PLOT, METRICS, RUN_CONFIG)] + [kept_checkpoint(run.save_dir)])
        result.best_recall_at_1 = self.state.best
        if run.machine.distributed.enabled:
            torch.distributed.barrier()  # the others wait while rank 0 validates and saves
        return result

    def _epochs(self, stop_after_epoch: Callable[[int], bool] | None) -> None:
        config, result = self.config, self.result
        for epoch in range(self.state.epoch + 1, config.epochs + 1):
            record = self.run_epoch(epoch)
            self.end_epoch(record)
            self.state.epoch = epoch
            if stop_agreed(self.stop, self.run_parts.machine) and epoch < config.epochs:
                interrupted(self.stop.signal_number, self.run_parts.save_dir / LAST_CHECKPOINT,
                            epoch + 1, self.state.step)
            if reached_max_steps(self.config, self.state):
                self.reporter.message(Wording(f"reached {{max_steps}} {config.max_steps}",
                                              ("max_steps",)))
                result.stopped_early = epoch < config.epochs
                break
            if stop_after_epoch is not None and stop_after_epoch(epoch):
                result.stopped_early = epoch < config.epochs
                break

    def run_epoch(self, epoch: int) -> EpochRecord:
        """The inner loop: gather each target batch's micro-batches, step, report."""
        config, run, state = self.config, self.run_parts, self.state
        device, loaders, should_stop = run.machine.device, run.loaders, run.opt.should_stop
        progress, state.progress = state.progress or EpochProgress(), None
        training_mode(run.nets.trained, config.freeze_bn)
        loaders.sampler.set_epoch(epoch, skip=progress.batches_done)
        self.reporter.epoch_start(epoch, config.epochs,
                                  run.steps_per_epoch - progress.batches_done)
        # Figures of the steps before an interruption carry over into this epoch's record.
        started = time.perf_counter() - progress.seconds
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        micro_per_step = loaders.sampler.micro_batches_per_step
        wait_started = time.perf_counter()
        for position, batch in enumerate(loaders.train, start=1):
            progress.waited += time.perf_counter() - wait_started
            for failure in batch.failed:
                loaders.train_failures(failure)
            if len(batch):
                group.append((to_input(batch.images, device, config.channels_last),
                              batch.labels.to(device, non_blocking=True)))
            if position % micro_per_step:  # the target batch is not complete yet
                if should_stop is not None and should_stop():
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
                                * run.machine.distributed.world_size)
            group = []
            self._report_step(progress, loss, started)
            if stop_agreed(self.stop, run.machine) and progress.batches_done < run.steps_per_epoch:
                self.stop_mid_epoch(epoch, progress, started)
            if reached_max_steps(self.config, self.state):
                break
            wait_started = time.perf_counter()
        return self.epoch_record(epoch, progress, started)

    def _report_step(self, progress: EpochProgress, loss: float | None, started: float) -> None:
        if loss is not None:
            progress.losses.append(loss)
        elapsed = time.perf_counter() - started
        lr = self.run_parts.opt.scheduler.get_last_lr()[0]
        speed = progress.images / elapsed if elapsed > 0 else 0.0
        self.reporter.step(progress.losses[-1] if progress.losses else float("nan"), lr, speed)
        self.trackers.step(self.state.step, loss, lr, speed)
        progress.batches_done += 1

    def optimizer_step(self, group: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
        """One optimizer step over a target batch; its loss, or None when it was skipped
        (empty, or a non-finite loss: counted, and too many in a row stop the run)."""
        opt, nets = self.run_parts.opt, self.run_parts.nets
        opt.optimizer.zero_grad(set_to_none=True)
        try:
            loss = (opt.backward(nets.trained, group, opt.loss_fn, self.run_parts.machine.autocast,
                                 opt.scaler.scale, **opt.step_options) if group else None)
        except nets.compile_errors as exc:
            raise TrainingError(f"{{compile}} failed: {first_line(exc)}; train without "
                                "{compile}", options=("compile",)) from None
        self.state.step += 1
        if loss is None or not torch.isfinite(loss):
            self._skip_step(loss is not None)
            return None
        self.state.consecutive_nonfinite = 0
        if self.config.grad_clip is not None:
            opt.scaler.unscale_(opt.optimizer)
            torch.nn.utils.clip_grad_norm_(nets.model.parameters(), self.config.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        if opt.average is not None:
            opt.average.update()
        return float(loss)

    def _skip_step(self, nonfinite: bool) -> None:
        state, opt = self.state, self.run_parts.opt
        state.nonfinite_total += nonfinite
        state.consecutive_nonfinite += nonfinite
        if state.consecutive_nonfinite >= self.config.max_nonfinite:
            raise TrainingError(
                f"the loss was not finite for {state.consecutive_nonfinite} steps in a row "
                f"(epoch {state.epoch + 1}, step {state.step - 1}); lower {{lr}}, use "
                "{precision} fp32 or bf16, or set {grad_clip}",
                options=("lr", "precision", "grad_clip"))
        opt.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped step still advances the schedule, so it stays tied to epochs.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            opt.scheduler.step()

    def epoch_record(self, epoch: int, progress: EpochProgress, started: float) -> EpochRecord:
        """Validate, then the epoch's figures."""
        state = self.state
        train_seconds = time.perf_counter() - started
        try:
            figures = validation_figures(self.run_parts, self.stop)
        except StepAbandoned:  # resumed, the epoch has no steps left and validates first
            self.stop_mid_epoch(epoch, progress, started, "validation was abandoned; ")
        recall = figures.get("val_recall_at_1")
        improved = recall is not None and (state.best is None or recall > state.best)
        if improved:
            state.best = recall
        return EpochRecord(
            epoch=epoch, step=state.step,
            loss=float(np.mean(progress.losses)) if progress.losses else None,
            lr=self.run_parts.opt.scheduler.get_last_lr()[0], **figures,
            images_per_second=progress.images / train_seconds if train_seconds > 0 else None,
            seconds=time.perf_counter() - started,
            data_wait_fraction=progress.waited / train_seconds if train_seconds > 0 else None,
            nonfinite_steps=state.nonfinite_total, best=improved,
            below_untrained=below(recall, self.result.untrained_recall_at_1),
        )

    def end_epoch(self, record: EpochRecord) -> None:
        """Save last.pt (and best.pt), rewrite metrics.jsonl and the plot, report."""
        save_dir = self.run_parts.save_dir
        self.state.history.append(record)
        self.save(save_dir / LAST_CHECKPOINT, record.epoch)
        if record.best:
            self.save(save_dir / BEST_CHECKPOINT, record.epoch)
        if self.run_parts.machine.distributed.is_main:
            write_metrics(save_dir, self.state.history)
            plot(save_dir, self.state.history)
        self.trackers.epoch(record)
        self.reporter.epoch_end(record)

    # ---- saving and stopping
    def save(self, path, epoch: int, progress: EpochProgress | None = None) -> None:
        """A checkpoint of the model and ``state_dict`` as of the end of ``epoch`` (and
        ``progress`` into the next one)."""
        run = self.run_parts
        if not run.machine.distributed.is_main:
            return
        with applied(run.opt.average):  # the checkpoint's model is what validation measured
            state = {**self.state_dict(progress), "epoch": epoch, "plan": run.plan.to_dict()}
            atomic_save(training_state(run.nets.model, run.nets.spec, to_plain(self.config),
                                       run.data.scan.classes, **state), path)

    def stop_mid_epoch(self, epoch: int, progress: EpochProgress, started: float,
                       abandoned: str = "") -> NoReturn:
        """Save where epoch ``epoch`` stands, then raise Interrupted."""
        progress.seconds = time.perf_counter() - started
        self.save(self.run_parts.save_dir / LAST_CHECKPOINT, epoch - 1, progress)
        interrupted(self.stop.signal_number, self.run_parts.save_dir / LAST_CHECKPOINT, epoch,
                    self.state.step, abandoned)


def kept_checkpoint(save_dir: Path) -> Path:
    """best.pt where validation wrote one, else last.pt: the checkpoint a tracker keeps."""
    best = save_dir / BEST_CHECKPOINT
    return best if best.is_file() else save_dir / LAST_CHECKPOINT


def stop_agreed(stop: StopRequest, machine) -> bool:
    """Whether to stop now: asked here, or under DDP on any rank (all ranks stop at the same
    step, or their collectives hang)."""
    stopping = stop.asked
    if machine.distributed.enabled:
        stopping = any_rank(stopping, machine.device)
    return stopping


def reached_max_steps(config: TrainConfig, state: TrainState) -> bool:
    return config.max_steps is not None and state.step >= config.max_steps
