"""The ``ascension`` command line: each command parses its options, calls its API function
(``ascension_cli.api.run_*``), and prints what came back. No workflow lives here.

Options are declared once, as fields of the models in ``config/``; ``cli/options.options_of``
turns them into Typer parameters. The API is imported inside each command, after the options
are checked, so ``--help`` and a mistyped option answer without loading torch.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ascension_cli import __version__
from ascension_cli.cli import console as out
from ascension_cli.cli.catalog_group import catalog_app
from ascension_cli.cli.console import ImageProgress, RichReporter, console, err_console, shown
from ascension_cli.cli.guard import say_error, user_errors
from ascension_cli.cli.options import extra_option, given, options_of
from ascension_cli.config import (
    CalibrateConfig,
    DemoConfig,
    EmbedConfig,
    EvalConfig,
    ExportConfig,
    IndexConfig,
    ManifestConfig,
    ReportConfig,
    SearchConfig,
    ServeConfig,
    ShardConfig,
    TrainConfig,
    resolve,
)
from ascension_cli.errors import AscensionError

app = typer.Typer(
    name="ascension",
    help="Train image-embedding models with Supervised Contrastive Learning and measure how "
    "well they retrieve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.add_typer(catalog_app)  # ascension catalog remove|relabel|replace|history|snapshot


def _version(value: bool) -> None:
    if value:
        console.print(f"ascension {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool | None, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version.")] = None,
          ) -> None:
    """Train image-embedding models with SupCon and measure how well they retrieve."""


@app.command(no_args_is_help=True)
@options_of(
    TrainConfig,
    extra_option("nproc", int, "Train with this many processes on this machine (torchrun + DDP, "
                 "one per GPU; gloo on the CPU). --target-batch stays the global batch."),
    extra_option("config", Path, "YAML or TOML file of options; command-line options override "
                 "it."),
)
def train(**options: Any) -> None:
    """Train a SupCon embedding model on a class-per-folder image tree.

    Every target batch holds --target-batch images (--samples-per-class per class), each seen in
    --views augmentations; with gradient caching the loss contrasts the whole target batch while
    memory holds one --batch-size micro-batch.
    """
    nproc, config = options.pop("nproc"), options.pop("config")
    with user_errors():
        settings = resolve(TrainConfig, given(options), config)
        from ascension_cli.api import run_training

        out.print_training_summary(run_training(settings, RichReporter(console), nproc))


@app.command()
@options_of(DemoConfig)
def demo(**options: Any) -> None:
    """Train a tiny model on scikit-learn's bundled handwritten digits, offline, on the CPU.

    Writes the digits as a class-per-folder tree, each in random ink and paper colours (the class
    is the shape, not the colour), trains from scratch with colour-agnostic augmentation for
    under a minute, and prints validation recall@1 before and after training.
    """
    started = time.perf_counter()
    with user_errors():
        settings = resolve(DemoConfig, given(options))
        from ascension_cli.api import run_demo

        before, after = run_demo(settings, RichReporter(console))
        out.say(f"validation recall@1: before training {before:.4f} -> after {after:.4f} "
                f"(demo took {time.perf_counter() - started:.0f} s)")


@app.command(no_args_is_help=True)
@options_of(EmbedConfig)
def embed(**options: Any) -> None:
    """Write L2-normalised feature vectors, labels and paths for a folder, manifest or shards.

    The .npz holds vectors (float32), labels (class index, -1 for a flat folder), paths relative
    to IMAGE_ROOT, class names, model name, checkpoint sha256 and feature kind, in a
    deterministic order. Finished chunks are kept in OUTPUT.parts/ until the file is written: an
    interrupted run, started again, embeds only the rest. Under torchrun (torchrun
    --nproc-per-node N -m ascension_cli embed ...) each process embeds its share of the chunks
    and the file is the one a single process writes.
    """
    with user_errors():
        settings = resolve(EmbedConfig, given(options))
        from ascension_cli.api.embedding import main_process, parts_kept, run_embed
        from ascension_cli.progress import Progress

        try:
            with ImageProgress("embedding") if main_process() else nullcontext(
                    Progress()) as progress:
                result = run_embed(settings, progress)
        except KeyboardInterrupt:
            err_console.print(f"interrupted: the finished chunks are kept in "
                              f"{escape(shown(parts_kept(settings)))}; the same command "
                              "embeds only the rest", soft_wrap=True, highlight=False)
            raise typer.Exit(130) from None
        out.print_embedded(result)


@app.command(name="eval", no_args_is_help=True)
@options_of(EvalConfig)
def evaluate_command(**options: Any) -> None:
    """Report Recall@k, Precision@1, R-Precision, MAP@R and per-class Recall@1 (FAISS search).

    With a checkpoint and IMAGE_ROOT the images are embedded first (--features, --batch-size,
    --precision, --workers, --device and --channels-last apply to that step).
    """
    with user_errors():
        settings = resolve(EvalConfig, given(options))
        from ascension_cli.api import run_eval

        with ImageProgress("evaluating") as progress:
            measured = run_eval(settings, progress)
        out.print_evaluation(measured.run)
        if measured.open_set is not None:
            out.print_open_set(measured.open_set)
        for what, path in measured.written.items():
            out.say(f"{'metrics' if what == 'json' else 'retrieval picture'} written to {path}")


@app.command(no_args_is_help=True)
@options_of(ReportConfig)
def report(**options: Any) -> None:
    """Write one HTML page showing where retrieval fails: metrics, per-class Recall@1, the
    most-confused class pairs and the worst queries with photos, a map of the embeddings, and
    with a training run folder its curves and options. Self-contained: opens offline.
    """
    with user_errors():
        settings = resolve(ReportConfig, given(options))
        from ascension_cli.api import run_report

        with ImageProgress("reporting") as progress:
            info = run_report(settings, progress)
        sampled = (f"; the map shows {info.drawn_points} of {info.total_points} vectors"
                   if info.drawn_points < info.total_points else "")
        out.say(f"report written to {info.path} in {info.seconds:.1f} s{sampled}")


@app.command(no_args_is_help=True)
@options_of(IndexConfig)
def index(**options: Any) -> None:
    """Build a searchable catalogue of known items: FAISS index, paths, labels and the model.

    The catalogue folder holds everything `ascension search` needs, the model included. An add
    warns of new items as similar as an item of another class; --check lists what to clean.
    """
    with user_errors():
        settings = resolve(IndexConfig, given(options))
        from ascension_cli.api import run_index

        with ImageProgress("indexing") as progress:
            result = run_index(settings, progress)
        out.print_indexed(settings, result)


@app.command(no_args_is_help=True)
@options_of(CalibrateConfig)
def calibrate(**options: Any) -> None:
    """Choose the "not in the catalogue" threshold on labelled photos it was not built from, so
    that --target-fmr of new photos of items it lacks pass; `search` and `serve` then use it."""
    with user_errors():
        settings = resolve(CalibrateConfig, given(options))
        from ascension_cli.api import run_calibrate

        with ImageProgress("calibrating") as progress:
            catalog = run_calibrate(settings, progress)
        out.print_calibration(catalog.calibration)


@app.command(name="search", no_args_is_help=True)
@options_of(SearchConfig)
def search_command(**options: Any) -> None:
    """Which catalogue item is each photo? Top-k matches and a similarity-weighted vote."""
    with user_errors():
        settings = resolve(SearchConfig, given(options))
        from ascension_cli.api import run_search

        with ImageProgress("searching") as progress:
            results = run_search(settings, progress)
        out.print_search(settings.catalog, results)
        if settings.json_file is not None:
            out.say(f"results written to {settings.json_file}")


@app.command(no_args_is_help=True)
@options_of(ManifestConfig)
def manifest(**options: Any) -> None:
    """Write a manifest (CSV or Parquet) of a class-folder tree: path, label, a seeded per-class
    split (train / validation / test) and query/gallery flags on the test rows. Every command
    that reads a folder reads it too.
    """
    with user_errors():
        settings = resolve(ManifestConfig, given(options))
        from ascension_cli.api import run_manifest

        written = run_manifest(settings)
        out.say(f"wrote {written.description} to {written.output}")


@app.command(no_args_is_help=True)
@options_of(ShardConfig)
def shard(**options: Any) -> None:
    """Write WebDataset tar shards of a folder tree or manifest: each image's bytes as they are,
    its class index and label, in a seeded shuffled order; dataset.json lists the classes and
    each shard's count. `train` and `embed` stream them (a folder, a pattern or a URL).
    """
    with user_errors():
        settings = resolve(ShardConfig, given(options))
        from ascension_cli.api import run_shard

        with ImageProgress("sharding") as progress:
            written = run_shard(settings, progress)
        out.say(f"wrote {written.description} in {written.output}")


@app.command(no_args_is_help=True)
@options_of(ExportConfig)
def export(**options: Any) -> None:
    """Export the model: normalised images in, L2-normalised embeddings out, any batch size."""
    with user_errors():
        settings = resolve(ExportConfig, given(options))
        from ascension_cli.api import run_export

        info = run_export(settings)
        out.say(f"wrote {info['format']} model to {info['path']}: input (batch, 3, "
                f"{info['image_size']}, {info['image_size']}) normalised with mean "
                f"{info['mean']} std {info['std']}; output (batch, {info['embedding_dim']}) "
                "L2-normalised")


@app.command(no_args_is_help=True)
@options_of(ServeConfig)
def serve(**options: Any) -> None:
    """Serve a catalogue over HTTP: a web page at / to drop or take a photo, and a JSON API
    (POST /search, GET /items/ID/image, /info, /healthz). Binds to 127.0.0.1 unless --host says
    otherwise.
    """
    with user_errors():
        settings = resolve(ServeConfig, given(options))
        from ascension_cli.api import run_serve

        run_serve(settings, on_ready=lambda: out.say(
            f"serving {settings.catalog} on http://{settings.host}:{settings.port}/ "
            f"({settings.workers} process(es); writes "
            f"{'on' if settings.allow_writes else 'off'}; Ctrl-C stops)"))


def main() -> None:
    """Console-script entry point."""
    # File names need not be UTF-8; print what cannot be encoded as escapes, never crash on it.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        app()
    except AscensionError as exc:  # raised outside a command's guard (should not happen)
        say_error(exc)
        sys.exit(exc.exit_code)
