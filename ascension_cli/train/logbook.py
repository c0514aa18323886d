"""What a training run leaves to read: the per-epoch records, metrics.jsonl, training.png and the
dataset summary table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ascension_cli.atomic import atomic_write, atomic_write_text
from ascension_cli.data.folder import FolderScan

METRICS = "metrics.jsonl"
PLOT = "training.png"
# What validation measures each epoch: EpochRecord's field, and how a person reads it.
VALIDATION_FIGURES = (("val_recall_at_1", "recall@1"), ("val_recall_at_5", "recall@5"),
                      ("val_map_at_r", "MAP@R"))
# The same figures with the validation photos searched among the training photos, as a catalogue
# of them searches (``train/validation.py``): measured for the starting weights and best.pt.
GALLERY_FIGURES = (("gallery_recall_at_1", "recall@1"), ("gallery_recall_at_5", "recall@5"),
                   ("gallery_map_at_r", "MAP@R"))


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
    val_recall_at_5: float | None = None  # None in the records of older runs
    val_map_at_r: float | None = None
    gallery_recall_at_1: float | None = None  # epoch 0's and best.pt's only (GALLERY_FIGURES)
    gallery_recall_at_5: float | None = None
    gallery_map_at_r: float | None = None


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


def below(recall: float | None, untrained: float | None) -> bool:
    """Validation recall not above the untrained model's."""
    return recall is not None and untrained is not None and recall <= untrained


def figures_of(record: EpochRecord) -> dict[str, float | None]:
    """A record's validation figures under their field names."""
    return {key: getattr(record, key) for key, _ in VALIDATION_FIGURES}


def shown_figures(figures: dict[str, float | None], names=VALIDATION_FIGURES) -> str:
    """"recall@1 0.8000, recall@5 0.9100, MAP@R 0.4660": the figures measured, as read
    ("recall@1 -" where none was)."""
    return ", ".join(f"{name} {figures[key]:.4f}" for key, name in names
                     if figures.get(key) is not None) or "recall@1 -"


def best_record(history: list[EpochRecord]) -> EpochRecord | None:
    """The epoch best.pt holds: the last one marked best (epoch 0 where none beat the start)."""
    kept = [record for record in history if record.best]
    return kept[-1] if kept else None


def start_and_best(history: list[EpochRecord]) -> tuple[EpochRecord, EpochRecord] | None:
    """The starting model's record (epoch 0) and best.pt's, where best.pt holds a trained
    epoch."""
    start = history[0] if history and history[0].epoch == 0 else None
    best = best_record(history)
    if start is None or best is None or best.epoch == 0:
        return None
    return start, best


def lost_to_start(history: list[EpochRecord],
                  names=VALIDATION_FIGURES) -> list[tuple[str, float, float]]:
    """The validation figures (or ``GALLERY_FIGURES``) in which best.pt's epoch (chosen by
    recall@1) is below the starting model's (epoch 0): (name, before, best.pt's), where both
    were measured."""
    pair = start_and_best(history)
    if pair is None:
        return []
    start, best = pair
    return [(name, getattr(start, key), getattr(best, key)) for key, name in names
            if getattr(start, key) is not None and getattr(best, key) is not None
            and getattr(best, key) < getattr(start, key)]


def data_rows(scan: FolderScan, train: int, val: int) -> list[tuple[str, str]]:
    """The dataset table: classes, images, per-class range, split and what was skipped."""
    counts = scan.class_counts()
    rows = [
        ("classes", str(len(scan.classes))),
        ("images", str(len(scan.labels))),  # shards: labels from their counts, no paths
        ("images per class", f"{counts.min()}-{counts.max()} (median {int(np.median(counts))})"),
        ("train / val", f"{train} / {val}"),
    ]
    if scan.splits is not None:
        rows.append(("test rows (not read)", str(int((scan.splits == "test").sum()))))
    skipped = scan.skipped
    if skipped:
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        rows.append(("skipped", f"{sum(skipped.values())} ({detail})"))
    else:
        rows.append(("skipped", "0"))
    return rows


def write_metrics(save_dir: Path, history: list[EpochRecord]) -> None:
    # Rewritten whole (it is small) and atomically, so a resumed run never repeats a line.
    lines = "".join(json.dumps(asdict(record)) + "\n" for record in history)
    atomic_write_text(save_dir / METRICS, lines)


def plot(save_dir: Path, history: list[EpochRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in history if r.loss is not None]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r.epoch for r in trained], [r.loss for r in trained], marker="o")
    axes[0].set(title="SupCon loss", xlabel="epoch")
    axes[1].plot([r.epoch for r in trained], [r.lr for r in trained], marker="o", color="C1")
    axes[1].set(title="learning rate (end of epoch)", xlabel="epoch")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for number, (key, name) in enumerate(VALIDATION_FIGURES):
        validated = [r for r in history if getattr(r, key) is not None]
        if validated:
            axes[2].plot([r.epoch for r in validated], [getattr(r, key) for r in validated],
                         marker="o", color=f"C{2 + number}", label=name)
    axes[2].set(title="validation", xlabel="epoch", ylim=(0, 1.02))
    if axes[2].lines:
        axes[2].legend(loc="lower right", fontsize="small")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(save_dir / PLOT, lambda handle: figure.savefig(handle, format="png", dpi=100))
    plt.close(figure)
