"""Training from Python, as ``ascension train`` does it (the command line calls
``run_training``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascension_cli.config import WARMUP_SHARE, TrainConfig, resolve
from ascension_cli.errors import TrainingError

if TYPE_CHECKING:
    from ascension_cli.train.logbook import EpochRecord
    from ascension_cli.train.reporter import Reporter


def _default(field: str) -> Any:
    return TrainConfig.model_fields[field].get_default(call_default_factory=True)


@dataclass
class TrainSummary:
    """What ``train_supcon`` returns."""

    best_recall_at_1: float | None  # best.pt's validation Recall@1 (the start's included)
    epochs_run: int  # epochs trained by this call (a resumed run counts only its own)
    last_checkpoint: Path
    best_checkpoint: Path | None  # None without a validation split
    history: list[EpochRecord]  # one record per epoch, epoch 0 the untrained model
    save_dir: Path | None = None

    @property
    def untrained_recall_at_1(self) -> float | None:
        return self.history[0].val_recall_at_1 if self.history else None

    @property
    def lost_to_start(self) -> list[tuple[str, float, float]]:
        """The validation figures in which best.pt (chosen by recall@1) is below the starting
        weights: (name, before training, at best.pt)."""
        from ascension_cli.train.logbook import lost_to_start

        return lost_to_start(self.history)

    @property
    def gallery_check(self) -> tuple[dict[str, float | None], dict[str, float | None]] | None:
        """The validation photos searched among the training photos (``--gallery-check``), as
        a catalogue of them would search: (the starting weights' figures, best.pt's), keyed
        "recall@1", "recall@5", "MAP@R"; None where not measured or best.pt is the start."""
        from ascension_cli.train.logbook import GALLERY_FIGURES, start_and_best

        pair = start_and_best(self.history)
        if pair is None or any(record.gallery_recall_at_1 is None for record in pair):
            return None
        start, best = ({name: getattr(record, key) for key, name in GALLERY_FIGURES}
                       for record in pair)
        return start, best

    @property
    def gallery_lost_to_start(self) -> list[tuple[str, float, float]]:
        """As ``lost_to_start``, in the search among the training photos (``gallery_check``)."""
        from ascension_cli.train.logbook import GALLERY_FIGURES, lost_to_start

        return lost_to_start(self.history, GALLERY_FIGURES)

    @property
    def metrics_file(self) -> Path | None:
        """metrics.jsonl: each epoch's figures."""
        from ascension_cli.train.logbook import METRICS

        return None if self.save_dir is None else self.save_dir / METRICS

    @property
    def best_epoch(self) -> int | None:
        """The epoch best.pt holds: 0 where no epoch beat the starting weights."""
        from ascension_cli.train.logbook import best_record

        best = best_record(self.history)
        return None if best is None else best.epoch


def validation_text(record: EpochRecord) -> str:
    """An epoch's validation figures as a run prints them: "recall@1 0.8000, recall@5 0.9100,
    MAP@R 0.4660" (those measured)."""
    from ascension_cli.train.logbook import figures_of, shown_figures

    return shown_figures(figures_of(record))


def run_training(settings: TrainConfig, reporter: Reporter | None = None,
                 nproc: int | None = None) -> TrainSummary:
    """Train as ``settings`` say; with ``nproc`` > 1 (and not under torchrun already) the run is
    handed to torchrun with that many processes, and its summary read from its files."""
    from ascension_cli.runtime import launched_by_torchrun
    from ascension_cli.train import loop
    from ascension_cli.train.reporter import Reporter

    reporter = reporter or Reporter()
    if nproc is not None and nproc > 1 and not launched_by_torchrun():
        return _train_with_torchrun(settings, reporter, nproc)
    result = loop.train(settings, reporter)
    return _summary(result.save_dir, result.history, result.best_recall_at_1)


def _summary(save_dir: Path, history: list, best_recall: float | None) -> TrainSummary:
    from ascension_cli.formats import BEST_CHECKPOINT, LAST_CHECKPOINT

    best = save_dir / BEST_CHECKPOINT
    return TrainSummary(
        best_recall_at_1=best_recall,
        epochs_run=sum(record.loss is not None for record in history),
        last_checkpoint=save_dir / LAST_CHECKPOINT,
        best_checkpoint=best if best.is_file() else None,
        history=history, save_dir=save_dir)


def _train_with_torchrun(settings: TrainConfig, reporter: Reporter, nproc: int) -> TrainSummary:
    from ascension_cli.formats import LAST_CHECKPOINT
    from ascension_cli.launch import launch_torchrun
    from ascension_cli.model.checkpoint import load_checkpoint
    from ascension_cli.train.logbook import EpochRecord
    from ascension_cli.train.state import metrics_history

    reporter.message(f"launching {nproc} processes: torchrun --standalone "
                     f"--nproc-per-node={nproc} -m ascension_cli train ...")
    code = launch_torchrun(nproc, settings)
    if code != 0:  # the processes said why; their exit code is the run's
        error = TrainingError(f"the {nproc} training processes ended with exit code {code}")
        error.exit_code = code
        raise error
    save_dir = Path(settings.save_dir)
    saved = load_checkpoint(save_dir / LAST_CHECKPOINT)
    history = metrics_history(save_dir) or [EpochRecord(**record) for record in saved["history"]]
    return _summary(save_dir, history, saved.get("best_recall_at_1"))


def train_supcon(
    data_root: str | Path,
    batch_size: int | None = None,
    target_batch: int | None = None,
    epochs: int | None = None,
    warmup_epochs: float | None = None,
    lr: float | None = None,
    save_dir: str | Path | None = None,
    reporter: Reporter | None = None,
    nproc: int | None = None,
    config_file: str | Path | None = None,
    **options: Any,
) -> TrainSummary:
    """Train a SupCon embedding model on ``data_root/<class>/<image>``, as ``ascension train``.

    Args:
        data_root: folder of class folders, a manifest, or shards.
        batch_size: images per micro-batch, what fits in memory (default {batch_size}).
        target_batch: images per optimizer step, the batch SupCon contrasts; a multiple of
            batch_size (default {target_batch}).
        epochs: epochs (default {epochs}).
        warmup_epochs: linear LR warmup in epochs, then ``lr_schedule`` (default: {warmup} of
            the optimizer steps).
        lr: peak learning rate for 32 images per step, scaled to target_batch by lr_scaling
            (default {lr}).
        save_dir: where last.pt, best.pt, metrics.jsonl, training.png and config.yaml go
            (default {save_dir}).
        reporter: receives progress (``ascension_cli.train.reporter.Reporter``); silent if None.
        nproc: train with this many processes on this machine (torchrun + DDP).
        config_file: a YAML or TOML file of options; the arguments given here override it.
        **options: any other option of ``ascension train`` by its name, e.g. ``model=``,
            ``weights=``, ``temperature=``, ``head=``, ``image_size=``, ``resume="auto"``.

    Returns a ``TrainSummary``. A value out of range raises ``ConfigError`` naming the option;
    every error a user can cause is an ``AscensionError``.
    """
    given = dict(options, data_root=data_root, batch_size=batch_size, target_batch=target_batch,
                 epochs=epochs, warmup_epochs=warmup_epochs, lr=lr, save_dir=save_dir)
    settings = resolve(TrainConfig, {k: v for k, v in given.items() if v is not None},
                       None if config_file is None else Path(config_file))
    return run_training(settings, reporter, nproc)


if train_supcon.__doc__:
    train_supcon.__doc__ = train_supcon.__doc__.format(
        batch_size=_default("batch_size"), target_batch=_default("target_batch"),
        epochs=_default("epochs"), lr=_default("lr"), save_dir=_default("save_dir"),
        warmup=f"{WARMUP_SHARE:.0%}",
    )
