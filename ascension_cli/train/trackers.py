"""Experiment trackers (``--tracker tensorboard|mlflow``), each an optional extra, fed by rank 0.

Each logs per-step loss, learning rate and images/s, per-epoch validation figures, and the
resolved options; MLflow also keeps training.png, metrics.jsonl, config.yaml and the best
checkpoint as artefacts. A resumed run continues the same TensorBoard folder and the same MLflow
run (its id is kept in the save folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ascension_cli.errors import ConfigError
from ascension_cli.train.logbook import VALIDATION_FIGURES, EpochRecord, figures_of

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_RUN_ID = "mlflow-run-id.txt"
EXPERIMENT = "ascension"
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def require(names: Iterable[str]) -> None:
    """Fail in one line, before any work, when a tracker's extra is not installed."""
    import importlib.util

    for name in dict.fromkeys(names):
        if name == "none":
            continue
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{{tracker}} {name} needs {module}, which is not installed: "
                              f'pip install "ascension-cli[{extra}]"', options=("tracker",))


class Tracker:
    """What a tracker receives. The base class ignores everything."""

    def step(self, step: int, loss: float | None, lr: float, images_per_second: float) -> None:
        ...

    def epoch(self, record: EpochRecord) -> None: ...

    def close(self, finished: bool, artefacts: list[Path]) -> None: ...


class TensorBoard(Tracker):
    def __init__(self, save_dir: Path, options: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(save_dir / TENSORBOARD_DIR))
        table = "\n".join(f"| {key} | {value} |" for key, value in options.items())
        self.writer.add_text("options", "| option | value |\n|---|---|\n" + table)

    def step(self, step: int, loss: float | None, lr: float, images_per_second: float) -> None:
        if loss is not None:
            self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_second", images_per_second, step)

    def epoch(self, record: EpochRecord) -> None:
        for name in ("loss", *(key for key, _ in VALIDATION_FIGURES), "images_per_second"):
            value = getattr(record, name)
            if value is not None:
                self.writer.add_scalar(f"epoch/{name}", value, record.epoch)
        self.writer.flush()

    def close(self, finished: bool, artefacts: list[Path]) -> None:
        self.writer.close()


class MLflow(Tracker):
    def __init__(self, save_dir: Path, options: dict[str, Any], tracking_uri: str | None,
                 resume: bool):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or (save_dir / MLFLOW_DIR).resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store working behind this switch; it is what a run folder
            # wants (no database, no server), and the default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        id_file = save_dir / MLFLOW_RUN_ID
        if resume and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(EXPERIMENT))
        self.run_id = self.client.create_run(experiment_id, run_name=save_dir.name).info.run_id
        save_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id + "\n")
        self.client.log_batch(self.run_id, params=[
            Param(key, str(value)[:500]) for key, value in options.items()])

    def _log(self, values: dict[str, float | None], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()
                   if value is not None]
        self.client.log_batch(self.run_id, metrics=metrics)

    def step(self, step: int, loss: float | None, lr: float, images_per_second: float) -> None:
        self._log({"loss": loss, "lr": lr, "images_per_second": images_per_second}, step)

    def epoch(self, record: EpochRecord) -> None:
        self._log({"epoch_loss": record.loss, **figures_of(record)}, record.epoch)

    def close(self, finished: bool, artefacts: list[Path]) -> None:
        for path in artefacts:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class Trackers(Tracker):
    """All the trackers a run was given, as one."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def step(self, step: int, loss: float | None, lr: float, images_per_second: float) -> None:
        for tracker in self.trackers:
            tracker.step(step, loss, lr, images_per_second)

    def epoch(self, record: EpochRecord) -> None:
        for tracker in self.trackers:
            tracker.epoch(record)

    def close(self, finished: bool, artefacts: list[Path]) -> None:
        for tracker in self.trackers:
            tracker.close(finished, artefacts)


def open_trackers(names: Iterable[str], save_dir: Path, options: dict[str, Any],
                  tracking_uri: str | None, resume: bool) -> Trackers:
    """The trackers named (``none`` and repeats ignored), started for this run."""
    chosen = [name for name in dict.fromkeys(names) if name != "none"]
    require(chosen)
    made: list[Tracker] = []
    for name in chosen:
        made.append(TensorBoard(save_dir, options) if name == "tensorboard"
                    else MLflow(save_dir, options, tracking_uri, resume))
    return Trackers(made)
