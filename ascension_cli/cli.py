"""The ``ascension`` command line: parse, validate, call the worker, print. No ML here.

Workers are imported inside each command, so ``ascension --help`` answers without loading torch.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ascension_cli import __version__
from ascension_cli.config import TrainConfig, resolve
from ascension_cli.errors import AscensionError

if TYPE_CHECKING:
    from ascension_cli.train.loop import EpochRecord

app = typer.Typer(
    name="ascension",
    help="Train image-embedding models with Supervised Contrastive Learning and measure how "
    "well they retrieve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


def _default(field: str) -> str:
    value = TrainConfig.model_fields[field].get_default(call_default_factory=True)
    return f" (default: {value})"


@contextmanager
def _user_errors():
    """Turn a user-caused error into one line on stderr and a non-zero exit, never a traceback."""
    import torch

    try:
        yield
    except AscensionError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except torch.cuda.OutOfMemoryError:
        err_console.print(
            "[bold red]error:[/] the GPU ran out of memory: lower --batch-size (with gradient "
            "caching --target-batch, the contrastive batch, can stay as it is)",
            soft_wrap=True,
        )
        raise typer.Exit(4) from None
    except KeyboardInterrupt:
        err_console.print("interrupted", soft_wrap=True)
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"ascension {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
) -> None:
    """Train image-embedding models with SupCon and measure how well they retrieve."""


class RichReporter:
    """Draws the trainer's progress: tables at start, a bar per epoch, a line per epoch."""

    def __init__(self, out: Console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = out
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=out,
            transient=True,
        )
        self.task = None

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            f"epoch {epoch}/{epochs}", total=steps, loss="-", lr="-", speed=""
        )

    def step(self, loss: float, lr: float, images_per_second: float) -> None:
        self.progress.update(
            self.task, advance=1, loss=f"{loss:.4f}", lr=f"{lr:.2e}",
            speed=f"{images_per_second:.1f} img/s",
        )

    def epoch_end(self, record: EpochRecord) -> None:
        self.progress.stop()
        if self.task is not None:
            self.progress.remove_task(self.task)
        recall = "-" if record.val_recall_at_1 is None else f"{record.val_recall_at_1:.4f}"
        loss = "-" if record.loss is None else f"{record.loss:.4f}"
        speed = "-" if record.images_per_second is None else f"{record.images_per_second:.1f}"
        wait = (
            "" if record.data_wait_fraction is None
            else f"  data wait {record.data_wait_fraction:.0%}"
        )
        self.console.print(
            f"epoch {record.epoch:>3}  step {record.step:>6}  loss {loss}  lr {record.lr:.2e}  "
            f"val recall@1 {recall}{' (best)' if record.best else ''}  {speed} img/s  "
            f"{record.seconds:.1f}s{wait}",
            highlight=False,
            soft_wrap=True,
        )


@app.command(no_args_is_help=True)
def train(
    data_root: Annotated[
        Path, typer.Argument(help="Folder of class folders: DATA_ROOT/<class>/<image>.")
    ],
    batch_size: Annotated[
        int | None,
        typer.Option(help="Images per micro-batch: what fits in memory." + _default("batch_size")),
    ] = None,
    target_batch: Annotated[
        int | None,
        typer.Option(
            help="Images per optimizer step, and the batch SupCon contrasts (a multiple of "
            "--batch-size)." + _default("target_batch")
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs." + _default("epochs"))] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option(help="Linear LR warmup, then cosine decay." + _default("warmup_epochs")),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate." + _default("lr"))] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay." + _default("weight_decay"))
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="SupCon temperature." + _default("temperature"))
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Any timm model name." + _default("model"))
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(help="Square input size. (default: the model's pretrained input size)"),
    ] = None,
    embedding_dim: Annotated[
        int | None,
        typer.Option(help="Projection head output size." + _default("embedding_dim")),
    ] = None,
    head: Annotated[
        str | None, typer.Option(help="Projection head: mlp or linear." + _default("head"))
    ] = None,
    pretrained: Annotated[
        bool | None,
        typer.Option(
            "--pretrained/--no-pretrained",
            help="Start from timm's pretrained weights (downloaded or cached)."
            + _default("pretrained"),
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="Local timm-format weights (.safetensors/.pth); works offline."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="auto|bf16|fp16|fp32. auto: bf16 on Ampere+ GPUs and bf16-capable CPUs, fp16 "
            "with loss scaling on older GPUs, else fp32." + _default("precision")
        ),
    ] = None,
    accumulation: Annotated[
        str | None,
        typer.Option(
            help="cache: gradient caching, the loss sees the whole --target-batch. naive: plain "
            "accumulation, the loss sees each micro-batch alone." + _default("accumulation")
        ),
    ] = None,
    views: Annotated[
        int | None, typer.Option(help="Augmented views per image." + _default("views"))
    ] = None,
    samples_per_class: Annotated[
        int | None,
        typer.Option(help="Images per class in each target batch." + _default("samples_per_class")),
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help="color-agnostic (colour destroyed or randomised: the same item in another colour "
            "lands close) | standard (SimCLR) | none." + _default("augment")
        ),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share of each class held out for validation." + _default("val_fraction")
        ),
    ] = None,
    val_root: Annotated[
        Path | None,
        typer.Option(help="A separate validation tree with the same class folders."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Data-loading processes." + _default("workers"))
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed." + _default("seed"))] = None,
    device: Annotated[
        str | None, typer.Option(help="auto|cpu|cuda|cuda:N|mps." + _default("device"))
    ] = None,
    save_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where last.pt, best.pt, metrics.jsonl, training.png and config.yaml go."
            + _default("save_dir")
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="'auto' continues from SAVE_DIR/last.pt if it exists; or a PATH."),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many optimizer steps.")
    ] = None,
    grad_clip: Annotated[
        float | None, typer.Option(help="Clip the gradient norm to this value.")
    ] = None,
    max_nonfinite: Annotated[
        int | None,
        typer.Option(
            help="Stop after this many non-finite losses in a row (each skips its step)."
            + _default("max_nonfinite")
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML or TOML file of options; command-line options override it."),
    ] = None,
) -> None:
    """Train a SupCon embedding model on a class-per-folder image tree.

    Every target batch holds --target-batch images (--samples-per-class per class), each seen in
    --views augmentations; with gradient caching the loss contrasts the whole target batch while
    memory holds one --batch-size micro-batch.
    """
    given: dict[str, Any] = {
        key: value for key, value in locals().items() if key != "config" and value is not None
    }
    with _user_errors():
        settings = resolve(TrainConfig, given, config)
        from ascension_cli.train.loop import train as run_training

        result = run_training(settings, RichReporter(console))
        trained = [r for r in result.history if r.loss is not None]
        if trained:
            best = result.best_recall_at_1
            best_text = "-" if best is None else f"{best:.4f}"
            console.print(
                f"done: {len(trained)} epoch(s) this run, best validation recall@1 {best_text}; "
                f"checkpoints in {result.save_dir}",
                highlight=False,
            )


@app.command()
def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(help="Where the demo dataset and checkpoints go. (default: a temp folder)"),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs (about 3 s each on 2 cores).")] = 20,
    workers: Annotated[int, typer.Option(help="Data-loading processes.")] = 0,
) -> None:
    """Train a tiny model on scikit-learn's bundled handwritten digits, offline, on the CPU.

    Writes the digits as a class-per-folder tree, each in random ink and paper colours (the class
    is the shape, not the colour), trains from scratch with colour-agnostic augmentation for about
    a minute, and prints validation recall@1 before and after training.
    """
    import tempfile

    with _user_errors():
        from ascension_cli.demo import run_demo

        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="ascension-demo-") as temp:
                before, after = run_demo(Path(temp), epochs, workers, RichReporter(console))
        else:
            before, after = run_demo(workdir, epochs, workers, RichReporter(console))
        console.print(
            f"validation recall@1: before training {before:.4f} -> after {after:.4f}",
            highlight=False,
        )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except AscensionError as exc:  # raised outside a command's guard (should not happen)
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
