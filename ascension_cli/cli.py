"""The ``ascension`` command line: parse, validate, call the worker, print. No ML here.

Workers are imported inside each command, so ``ascension --help`` answers without loading torch.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ascension_cli import __version__
from ascension_cli.config import LR_REFERENCE_BATCH, WARMUP_SHARE, TrainConfig, resolve
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
    import errno

    from ascension_cli.errors import Interrupted

    try:
        yield
    except Interrupted as exc:
        err_console.print(str(exc), soft_wrap=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except AscensionError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; files written before stay as they were", soft_wrap=True)
        raise typer.Exit(130) from None
    except OSError as exc:
        # The machine's limits, not a bug: say which file and why. Writes are atomic, so the
        # previous checkpoint or vectors file is intact.
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        where = f" {exc.filename}" if exc.filename else ""
        err_console.print(
            f"[bold red]error:[/] cannot write{where}: {exc.strerror or exc}; files written "
            "before are intact", soft_wrap=True, highlight=False,
        )
        raise typer.Exit(5) from None
    except RuntimeError as exc:
        torch = sys.modules.get("torch")  # imported by the work, if it got that far
        if torch is None or not isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        err_console.print(
            "[bold red]error:[/] the GPU ran out of memory: lower --batch-size (with gradient "
            "caching --target-batch, the contrastive batch, can stay as it is)",
            soft_wrap=True,
        )
        raise typer.Exit(4) from None


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


def _progress_bar(out: Console, fields: str):
    """A transient bar: description, bar, done/total, the given task fields, elapsed and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(fields),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=out,
        transient=True,
    )


# Options shared by the commands that run a model over images (embed, eval, index, search).
BatchSizeOption = Annotated[int | None, typer.Option(help="Images per batch. (default: 64)")]
PrecisionOption = Annotated[str | None, typer.Option(help="auto|bf16|fp16|fp32.")]
WorkersOption = Annotated[
    int | None,
    typer.Option(help="Data-loading processes. (default: one per core up to 8 on a GPU; on the "
                 "CPU one per 8 cores, as the model's threads use them all)"),
]
DeviceOption = Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N|mps.")]
ChannelsLastOption = Annotated[
    bool | None,
    typer.Option("--channels-last/--no-channels-last",
                 help="Run the model on NHWC weights and images: faster convolutions (up to "
                 "1.8x measured on the CPU), same results up to rounding. (default: on)"),
]


class RichReporter:
    """Draws the trainer's progress: tables at start, a bar per epoch, a line per epoch."""

    def __init__(self, out: Console):
        self.console = out
        self.progress = _progress_bar(
            out, "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]}"
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

    def work_start(self, description: str, total: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, loss="-", lr="-", speed="")

    def work_advance(self, count: int) -> None:
        self.progress.update(self.task, advance=count)

    def work_end(self) -> None:
        self.progress.stop()
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def epoch_end(self, record: EpochRecord) -> None:
        self.work_end()
        recall = "-" if record.val_recall_at_1 is None else f"{record.val_recall_at_1:.4f}"
        loss = "-" if record.loss is None else f"{record.loss:.4f}"
        speed = "-" if record.images_per_second is None else f"{record.images_per_second:.1f}"
        wait = (
            "" if record.data_wait_fraction is None
            else f"  data wait {record.data_wait_fraction:.0%}"
        )
        marks = [word for word, shown in (("best", record.best),
                                          ("below the untrained model", record.below_untrained))
                 if shown]
        mark = f" ({', '.join(marks)})" if marks else ""
        self.console.print(
            f"epoch {record.epoch:>3}  step {record.step:>6}  loss {loss}  lr {record.lr:.2e}  "
            f"val recall@1 {recall}{mark}  {speed} img/s  "
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
        typer.Option(help="Linear LR warmup, then cosine decay. (default: "
                     f"{WARMUP_SHARE:.0%} of the run's optimizer steps)"),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help=f"Peak learning rate for {LR_REFERENCE_BATCH} images per step; "
                     "--lr-scaling turns it into the step's LR (linear: x --target-batch/"
                     f"{LR_REFERENCE_BATCH})." + _default("lr")),
    ] = None,
    lr_scaling: Annotated[
        str | None,
        typer.Option(help="How --lr follows --target-batch: linear, sqrt or none."
                     + _default("lr_scaling")),
    ] = None,
    backbone_lr_scale: Annotated[
        float | None,
        typer.Option(help="The backbone's LR as a share of the head's, with --head mlp or "
                     "linear." + _default("backbone_lr_scale")),
    ] = None,
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
        typer.Option(help="Projection head output size, with --head mlp or linear."
                     + _default("embedding_dim")),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(help="What the loss trains: none (the pooled backbone features, which "
                     "retrieval uses), or an mlp or linear projection head on them."
                     + _default("head")),
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
    workers: WorkersOption = None,
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
    sync_bn: Annotated[
        bool | None,
        typer.Option("--sync-bn", help="Under DDP, BatchNorm statistics over all processes."),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(help="Train with this many processes on this machine (torchrun + DDP, "
                     "one per GPU; gloo on the CPU). --target-batch stays the global batch."),
    ] = None,
    max_image_pixels: Annotated[
        int | None,
        typer.Option(help="Refuse images with more pixels than this (decompression bombs)."
                     + _default("max_image_pixels")),
    ] = None,
    max_nonfinite: Annotated[
        int | None,
        typer.Option(
            help="Stop after this many non-finite losses in a row (each skips its step)."
            + _default("max_nonfinite")
        ),
    ] = None,
    channels_last: ChannelsLastOption = None,
    cache_images: Annotated[
        bool | None,
        typer.Option("--cache-images",
                     help="Decode each image once, keep it in memory with its short side at "
                     "twice the input size, for datasets that fit in RAM (refused past 60% of "
                     "free memory)."),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option("--compile",
                     help="torch.compile the model: the first steps compile it (minutes), later "
                     "ones may run faster on a GPU. Measured no gain on the CPU."),
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
        key: value for key, value in locals().items()
        if key not in ("config", "nproc") and value is not None
    }
    with _user_errors():
        settings = resolve(TrainConfig, given, config)
        if nproc is not None and nproc > 1:
            from ascension_cli.train.distributed import launched_by_torchrun

            if not launched_by_torchrun():
                raise typer.Exit(_launch_torchrun(nproc, given, config))
        from ascension_cli.train.loop import train as run_training

        result = run_training(settings, RichReporter(console))
        trained = [r for r in result.history if r.loss is not None]
        if trained:
            best, untrained = result.best_recall_at_1, result.untrained_recall_at_1
            best_text = "-" if best is None else f"{best:.4f}"
            console.print(
                f"done: {len(trained)} epoch(s) this run, best validation recall@1 {best_text}; "
                f"checkpoints in {result.save_dir}",
                highlight=False,
            )
            if best is not None and untrained is not None and best <= untrained:
                console.print(
                    f"note: training has not yet beaten the untrained model (validation "
                    f"recall@1 {untrained:.4f} before training); best.pt holds the best trained "
                    "epoch. Train longer, or lower --lr.", highlight=False,
                )


def _torchrun_arguments(given: dict[str, Any], config: Path | None) -> list[str]:
    """The train options given on this command line, spelled again for the torchrun workers."""
    given = dict(given)
    arguments = [str(given.pop("data_root"))]
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            # Flag-only options (--sync-bn) are only ever given as True; False is --no-X.
            arguments.append(flag if value else "--no-" + flag[2:])
        else:
            arguments += [flag, str(value)]
    if config is not None:
        arguments += ["--config", str(config)]
    return arguments


def _launch_torchrun(nproc: int, given: dict[str, Any], config: Path | None) -> int:
    """Re-run this train command under torchrun with ``nproc`` processes; its exit code."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "ascension_cli", "train",
               *_torchrun_arguments(given, config)]
    console.print(f"launching {nproc} processes: torchrun --standalone --nproc-per-node={nproc} "
                  "-m ascension_cli train ...", highlight=False, soft_wrap=True)
    return subprocess.run(command).returncode


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

        folder = (tempfile.TemporaryDirectory(prefix="ascension-demo-") if workdir is None
                  else nullcontext(workdir))
        with folder as where:
            before, after = run_demo(Path(where), epochs, workers, RichReporter(console))
        console.print(
            f"validation recall@1: before training {before:.4f} -> after {after:.4f}",
            highlight=False,
        )


class _ImageProgress:
    """A progress bar with images/s for embedding runs."""

    def __init__(self, description: str):
        self.description = description
        self.progress = _progress_bar(console, "{task.fields[rate]}")
        self.task = None

    def start(self, total: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=total, rate="")

    def advance(self, count: int) -> None:
        self.progress.advance(self.task, count)
        speed = self.progress.tasks[0].speed
        if speed:
            self.progress.update(self.task, rate=f"{speed:.1f} img/s")

    def failed(self, failure) -> None:
        self.progress.console.print(f"skipped unreadable image: {failure.reason}",
                                    highlight=False, soft_wrap=True)

    def __enter__(self) -> _ImageProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def _embed(checkpoint: Path, image_root: Path, description: str, **options):
    from ascension_cli.embed import embed_folder

    with _ImageProgress(description) as progress:
        return embed_folder(
            checkpoint, image_root, on_start=progress.start, on_batch=progress.advance,
            on_failed=progress.failed, **options,
        )


@app.command(no_args_is_help=True)
def embed(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint from `ascension train`.")],
    image_root: Annotated[
        Path,
        typer.Argument(help="Class folders (IMAGE_ROOT/<class>/<image>) or a flat image folder."),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Vectors file to write (.npz).")
    ] = Path("vectors.npz"),
    features: Annotated[
        str | None,
        typer.Option(help="backbone (pooled trunk features, SupCon practice) or head "
                     "(the trained projection). (default: backbone)"),
    ] = None,
    batch_size: BatchSizeOption = None,
    precision: PrecisionOption = None,
    workers: WorkersOption = None,
    device: DeviceOption = None,
    channels_last: ChannelsLastOption = None,
    image_size: Annotated[
        int | None, typer.Option(help="Input size. (default: the checkpoint's)")
    ] = None,
    index: Annotated[
        Path | None, typer.Option(help="Also write a FAISS index of the vectors to this file.")
    ] = None,
) -> None:
    """Write L2-normalised feature vectors, labels and paths for a folder of images.

    The .npz holds vectors (float32), labels (class index, -1 for a flat folder), paths relative
    to IMAGE_ROOT, class names, model name, checkpoint sha256 and feature kind, in a
    deterministic order.
    """
    given = {key: value for key, value in locals().items() if value is not None}
    with _user_errors():
        from ascension_cli.config import EmbedConfig

        settings = resolve(EmbedConfig, given)  # before the workers' imports: errors come fast
        from ascension_cli.embed import save_vectors, write_index

        vectors = _embed(
            settings.checkpoint, settings.image_root, "embedding",
            kind=settings.features, image_size=settings.image_size, **settings.run_options(),
        )
        save_vectors(settings.output, vectors)
        if settings.index is not None:
            write_index(settings.index, vectors.vectors)
        labelled = "labelled" if vectors.labelled else "unlabelled"
        console.print(
            f"wrote {len(vectors)} {labelled} vectors of dimension {vectors.vectors.shape[1]} "
            f"({vectors.feature_kind}) to {settings.output}"
            + (f", index to {settings.index}" if settings.index else "")
            + (f"; {len(vectors.failed)} unreadable image(s) skipped" if vectors.failed else ""),
            highlight=False, soft_wrap=True,
        )


def _print_report(evaluation, class_names: list[str], recolored: dict) -> None:
    report = evaluation.report
    table = Table(title="retrieval", title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("clean", justify="right")
    for name in recolored:
        table.add_column(name, justify="right")
    for k, value in sorted(report.recall_at_k.items()):
        row = [f"Recall@{k}", f"{value:.4f}"]
        row += [f"{result.report.recall_at_k[k]:.4f}" for result in recolored.values()]
        table.add_row(*row)
    for label, value in (("Precision@1", report.precision_at_1),
                         ("R-Precision", report.r_precision), ("MAP@R", report.map_at_r)):
        table.add_row(label, f"{value:.4f}", *["" for _ in recolored])
    console.print(table)
    per_class = Table(title="per-class Recall@1", title_justify="left")
    per_class.add_column("class")
    per_class.add_column("Recall@1", justify="right")
    for label, value in sorted(report.per_class_recall_at_1.items(), key=lambda item: item[1]):
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        per_class.add_row(name, f"{value:.4f}")
    console.print(per_class)
    note = f"{report.queries} queries"
    if report.excluded_queries:
        note += f"; {report.excluded_queries} left out (no other item of their class)"
    if evaluation.approximate_recall is not None:
        note += (f"; {evaluation.index_kind} index finds {evaluation.approximate_recall:.1%} "
                 "of the exact top-k (sampled)")
    console.print(note, highlight=False)


@app.command(name="eval", no_args_is_help=True)
def evaluate_command(
    source: Annotated[
        Path,
        typer.Argument(help="A vectors file from `ascension embed`, or a checkpoint (then give "
                       "IMAGE_ROOT too, and it is embedded first)."),
    ],
    image_root: Annotated[
        Path | None, typer.Argument(help="Images to embed, with a checkpoint as SOURCE.")
    ] = None,
    gallery: Annotated[
        Path | None,
        typer.Option(help="A vectors file to search in; without it the queries are searched "
                     "among themselves, each query's own vector excluded."),
    ] = None,
    k: Annotated[str | None, typer.Option(help="Recall@k cut-offs. (default: 1,5,10)")] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the metrics to this JSON file.")
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(help="flat (exact) | hnsw | ivf (approximate, for galleries past about "
                     "a million vectors). (default: flat)"),
    ] = None,
    recolor: Annotated[
        bool | None,
        typer.Option("--recolor", help="With a checkpoint: also embed the queries hue-rotated "
                     "(90, 180 degrees) and in grayscale, search them where the clean queries "
                     "were searched (the --gallery, if given), and report Recall@k for each."),
    ] = None,
    show: Annotated[
        int | None, typer.Option(help="Draw this many queries with their top-k results.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Picture for --show. (default: retrieval.png)"),
    ] = None,
    features: Annotated[
        str | None, typer.Option(help="With a checkpoint: backbone or head. (default: backbone)")
    ] = None,
    batch_size: BatchSizeOption = None,
    precision: PrecisionOption = None,
    workers: WorkersOption = None,
    device: DeviceOption = None,
    channels_last: ChannelsLastOption = None,
) -> None:
    """Report Recall@k, Precision@1, R-Precision, MAP@R and per-class Recall@1 (FAISS search).

    With a checkpoint and IMAGE_ROOT the images are embedded first (--features, --batch-size,
    --precision, --workers, --device and --channels-last apply to that step).
    """
    given = {key: value for key, value in locals().items() if value is not None}
    with _user_errors():
        from ascension_cli.config import EvalConfig

        settings = resolve(EvalConfig, given)
        from ascension_cli.embed import load_vectors
        from ascension_cli.retrieval.evaluate import evaluate, evaluate_recoloured
        from ascension_cli.retrieval.report import evaluation_json, retrieval_grid, write_json

        embed_options = dict(kind=settings.features, **settings.run_options())
        if settings.image_root is not None:
            queries = _embed(settings.source, settings.image_root, "embedding", **embed_options)
        else:
            queries = load_vectors(settings.source)
        gallery_vectors = load_vectors(settings.gallery) if settings.gallery else None
        if (gallery_vectors is not None and gallery_vectors.paths == queries.paths
                and gallery_vectors.image_root == queries.image_root):
            console.print("the gallery holds the same images as the queries: searching them as "
                          "one set, each query's own vector excluded", highlight=False)
            gallery_vectors = None
        _check_evaluable(queries, gallery_vectors)
        if gallery_vectors is not None:
            queries.labels = _labels_by_name(queries, gallery_vectors.class_names)
        ks = settings.ks
        with _ImageProgress("searching") as progress:
            progress.start(len(queries))
            result = evaluate(
                queries.vectors, queries.labels,
                None if gallery_vectors is None else gallery_vectors.vectors,
                None if gallery_vectors is None else gallery_vectors.labels,
                ks=ks, index_kind=settings.index, on_progress=progress.advance,
            )
        recolored = {}
        if settings.recolor:
            from ascension_cli.data.augment import RECOLORINGS

            for kind in RECOLORINGS:
                shifted = _embed(settings.source, settings.image_root, f"embedding ({kind})",
                                 recolor=kind, **embed_options)
                recolored[kind] = evaluate_recoloured(
                    shifted.vectors, queries.labels, queries.vectors,
                    None if gallery_vectors is None else gallery_vectors.vectors,
                    None if gallery_vectors is None else gallery_vectors.labels,
                    ks=ks, index_kind=settings.index,
                )
        target = gallery_vectors if gallery_vectors is not None else queries
        class_names = target.class_names
        _print_report(result, class_names, recolored)
        if settings.json_file is not None:
            write_json(settings.json_file, evaluation_json(
                result, class_names, recolored,
                {"queries_file": str(settings.source),
                 "gallery_file": str(settings.gallery) if settings.gallery else None,
                 "model_name": queries.model_name, "feature_kind": queries.feature_kind},
            ))
            console.print(f"metrics written to {settings.json_file}", highlight=False)
        if settings.show:
            picture = retrieval_grid(
                settings.output, result,
                [Path(queries.image_root) / p for p in queries.paths], queries.labels,
                [Path(target.image_root) / p for p in target.paths], target.labels,
                class_names, queries=settings.show, k=min(5, max(ks)),
            )
            console.print(f"retrieval picture written to {picture}", highlight=False)


def _check_evaluable(queries, gallery) -> None:
    from ascension_cli.errors import VectorsError

    if not queries.labelled:
        raise VectorsError("the query vectors have no labels (a flat folder): metrics need "
                           "class folders")
    if gallery is not None:
        if not gallery.labelled:
            raise VectorsError("the gallery vectors have no labels: metrics need class folders")
        if gallery.vectors.shape[1] != queries.vectors.shape[1]:
            raise VectorsError(
                f"dimension mismatch: queries have {queries.vectors.shape[1]}, gallery "
                f"{gallery.vectors.shape[1]}"
            )
        if not set(gallery.class_names) & set(queries.class_names):
            raise VectorsError("queries and gallery share no class name: nothing can be relevant")


def _labels_by_name(queries, gallery_classes: list[str]):
    """Query labels re-indexed into the gallery's classes (matched by folder name)."""
    import numpy as np

    position = {name: index for index, name in enumerate(gallery_classes)}
    # A class the gallery lacks gets a label no gallery item has: its queries are left out.
    mapping = np.array([position.get(name, -2) for name in queries.class_names], dtype=np.int64)
    return mapping[queries.labels]


@app.command(no_args_is_help=True)
def index(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint from `ascension train`.")],
    gallery_root: Annotated[
        Path, typer.Argument(help="The known items: class folders, or a flat image folder.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Catalogue folder to write.")],
    add: Annotated[
        bool | None,
        typer.Option("--add", help="Append the images the catalogue does not hold yet, "
                     "without re-embedding the others (same checkpoint required)."),
    ] = None,
    features: Annotated[
        str | None, typer.Option(help="backbone or head. (default: backbone)")
    ] = None,
    batch_size: BatchSizeOption = None,
    precision: PrecisionOption = None,
    workers: WorkersOption = None,
    device: DeviceOption = None,
    channels_last: ChannelsLastOption = None,
) -> None:
    """Build a searchable catalogue of known items: FAISS index, paths, labels and the model.

    The catalogue folder holds everything `ascension search` needs, the model included.
    """
    given = {key: value for key, value in locals().items() if value is not None}
    with _user_errors():
        from ascension_cli.config import IndexConfig

        settings = resolve(IndexConfig, given)
        from ascension_cli.catalog import build_catalog

        with _ImageProgress("indexing") as progress:
            catalog, added = build_catalog(
                settings.checkpoint, settings.gallery_root, settings.output, add=settings.add,
                kind=settings.features, **settings.run_options(), on_start=progress.start,
                on_batch=progress.advance, on_failed=progress.failed,
            )
        console.print(
            f"catalogue {settings.output}: {len(catalog)} items in "
            f"{len(catalog.class_names)} classes ({added} added)", highlight=False,
            soft_wrap=True,
        )


@app.command(name="search", no_args_is_help=True)
def search_command(
    catalog: Annotated[Path, typer.Argument(help="A catalogue folder from `ascension index`.")],
    images: Annotated[list[Path], typer.Argument(help="Query images, or folders of them.")],
    k: Annotated[int | None, typer.Option(help="Matches per query. (default: 5)")] = None,
    threshold: Annotated[
        float | None,
        typer.Option(help="Cosine similarity the best match must reach; below it the query is "
                     "'unknown'."),
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the results to this JSON file.")
    ] = None,
    batch_size: BatchSizeOption = None,
    precision: PrecisionOption = None,
    workers: WorkersOption = None,
    device: DeviceOption = None,
    channels_last: ChannelsLastOption = None,
) -> None:
    """Which catalogue item is each photo? Top-k matches and a similarity-weighted vote."""
    given = {key: value for key, value in locals().items() if value is not None}
    with _user_errors():
        from ascension_cli.config import SearchConfig

        settings = resolve(SearchConfig, given)
        from ascension_cli.catalog import load_catalog, search_catalog
        from ascension_cli.data.folder import ImageDecodeError, list_images, load_image
        from ascension_cli.errors import DataError
        from ascension_cli.retrieval.report import write_json

        catalog_data = load_catalog(settings.catalog)
        paths = list_images(settings.images)
        for named in settings.images:  # an image asked for by name must be readable
            if named.is_file():
                try:
                    load_image(named)
                except ImageDecodeError as exc:
                    raise DataError(str(exc)) from None
        with _ImageProgress("searching") as progress:
            results = search_catalog(
                catalog_data, paths, settings.k, settings.threshold, on_failed=progress.failed,
                **settings.run_options(), on_start=progress.start, on_batch=progress.advance,
            )
        if not results:
            raise DataError("no readable query image")
        table = Table(title=f"search in {settings.catalog}", title_justify="left")
        for column in ("query", "prediction", "score", "best matches (similarity)"):
            table.add_column(column)
        for result in results:
            prediction = "unknown" if result.unknown else (result.predicted or "-")
            best = ", ".join(f"{m.class_name or Path(m.path).name} ({m.similarity:.3f})"
                             for m in result.matches[:3])
            table.add_row(result.query, prediction, f"{result.score:.2f}", best)
        console.print(table)
        if settings.json_file is not None:
            write_json(settings.json_file, {"catalog": str(settings.catalog), "k": settings.k,
                                            "threshold": settings.threshold,
                                            "results": [r.to_dict() for r in results]})
            console.print(f"results written to {settings.json_file}", highlight=False)


@app.command(no_args_is_help=True)
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint from `ascension train`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    export_format: Annotated[
        str | None, typer.Option("--format", help="onnx or torchscript. (default: onnx)")
    ] = None,
    features: Annotated[
        str | None, typer.Option(help="backbone or head. (default: backbone)")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Input size. (default: the checkpoint's)")
    ] = None,
) -> None:
    """Export the model: normalised images in, L2-normalised embeddings out, any batch size."""
    with _user_errors():
        from ascension_cli.config import ExportConfig

        given = {"checkpoint": checkpoint, "output": output, "format": export_format,
                 "features": features, "image_size": image_size}
        settings = resolve(ExportConfig, {k: v for k, v in given.items() if v is not None})
        from ascension_cli.export import export_model

        info = export_model(settings.checkpoint, settings.output, settings.format,
                            settings.features, settings.image_size)
        console.print(
            f"wrote {info['format']} model to {info['path']}: input (batch, 3, "
            f"{info['image_size']}, {info['image_size']}) normalised with mean {info['mean']} "
            f"std {info['std']}; output (batch, {info['embedding_dim']}) L2-normalised",
            highlight=False, soft_wrap=True,
        )


def main() -> None:
    """Console-script entry point."""
    # File names need not be UTF-8; print what cannot be encoded as escapes, never crash on it.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        app()
    except AscensionError as exc:  # raised outside a command's guard (should not happen)
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
