"""The ``ascension`` command line: each command parses, calls the worker, prints. No ML here.

Options are declared once, as fields of the models in ``config.py``; ``cli_options.options_of``
turns them into Typer parameters. Workers are imported inside each command, after the options
are checked, so ``--help`` and a mistyped option answer without loading torch.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ascension_cli import __version__
from ascension_cli.cli.console import (
    ImageProgress,
    RichReporter,
    console,
    err_console,
    print_index_info,
)
from ascension_cli.cli.options import extra_option, given, options_of
from ascension_cli.config import (
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


@contextmanager
def _user_errors():
    """Turn a user-caused error into one line on stderr and a non-zero exit, never a traceback."""
    from ascension_cli.errors import WRITE_REFUSED_ERRNOS, Interrupted

    try:
        yield
    except Interrupted as exc:
        err_console.print(escape(str(exc)), soft_wrap=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except AscensionError as exc:  # escaped: "[mlflow]" or a file name is not rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True,
                          highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; files written before stay as they were", soft_wrap=True)
        raise typer.Exit(130) from None
    except OSError as exc:
        # The machine's limits, not a bug: say which file and why. Writes are atomic, so the
        # previous checkpoint or vectors file is intact.
        if exc.errno not in WRITE_REFUSED_ERRNOS:
            raise
        where = f" {escape(str(exc.filename))}" if exc.filename else ""
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
    with _user_errors():
        settings = resolve(TrainConfig, given(options), config)
        if nproc is not None and nproc > 1:
            from ascension_cli.runtime import launched_by_torchrun

            if not launched_by_torchrun():
                raise typer.Exit(_launch_torchrun(nproc, settings))
        from ascension_cli.cli.console import print_training_summary
        from ascension_cli.train.loop import train as run_training

        print_training_summary(run_training(settings, RichReporter(console)))


def torchrun_config(settings: TrainConfig) -> dict[str, Any]:
    """What the torchrun workers are told: the options that were set (by the command line or a
    config file), so that a default stays a default there too (see ``sampler.fit_batches``)."""
    return settings.model_dump(mode="json", exclude_unset=True)


def _launch_torchrun(nproc: int, settings: TrainConfig) -> int:
    """Re-run this training under torchrun with ``nproc`` processes; its exit code."""
    import subprocess
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory(prefix="ascension-torchrun-") as folder:
        config = Path(folder) / "options.yaml"
        config.write_text(yaml.safe_dump(torchrun_config(settings)), encoding="utf-8")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", "-m", "ascension_cli", "train",
                   str(settings.data_root), "--config", str(config)]
        console.print(f"launching {nproc} processes: torchrun --standalone "
                      f"--nproc-per-node={nproc} -m ascension_cli train ...", highlight=False,
                      soft_wrap=True)
        return subprocess.run(command).returncode


@app.command()
@options_of(DemoConfig)
def demo(**options: Any) -> None:
    """Train a tiny model on scikit-learn's bundled handwritten digits, offline, on the CPU.

    Writes the digits as a class-per-folder tree, each in random ink and paper colours (the class
    is the shape, not the colour), trains from scratch with colour-agnostic augmentation for
    under a minute, and prints validation recall@1 before and after training.
    """
    import tempfile
    import time

    started = time.perf_counter()
    with _user_errors():
        settings = resolve(DemoConfig, given(options))
        from ascension_cli.demo import run_demo

        folder = (tempfile.TemporaryDirectory(prefix="ascension-demo-")
                  if settings.workdir is None else nullcontext(settings.workdir))
        with folder as where:
            before, after = run_demo(Path(where), settings.epochs, settings.workers,
                                     RichReporter(console))
        console.print(
            f"validation recall@1: before training {before:.4f} -> after {after:.4f} "
            f"(demo took {time.perf_counter() - started:.0f} s)", highlight=False)


def _embed(checkpoint: Path, image_root: Path, description: str, **options):
    from ascension_cli.embed.images import embed_folder

    with ImageProgress(description) as progress:
        return embed_folder(
            checkpoint, image_root, on_start=progress.start, on_batch=progress.advance,
            on_failed=progress.failed, **options,
        )


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
    with _user_errors():
        settings = resolve(EmbedConfig, given(options))
        from ascension_cli.embed.chunks import embed_across_processes, finish, parts_folder
        from ascension_cli.embed.images import write_index
        from ascension_cli.embed.vectors import save_vectors

        main_process = os.environ.get("RANK", "0") == "0"
        try:
            with ImageProgress("embedding") if main_process else nullcontext() as progress:
                vectors = embed_across_processes(
                    settings.checkpoint, settings.image_root, settings.output,
                    split=settings.split, chunk_size=settings.chunk_size,
                    feature_kind=settings.features, image_size=settings.image_size,
                    on_note=lambda note: console.print(note, highlight=False, soft_wrap=True),
                    **(dict(on_start=progress.start, on_batch=progress.advance,
                            on_failed=progress.failed) if progress else {}),
                    **settings.run_options(),
                )
        except KeyboardInterrupt:
            err_console.print(f"interrupted: the finished chunks are kept in "
                              f"{escape(str(parts_folder(settings.output)))}; the same command "
                              "embeds only the rest", soft_wrap=True, highlight=False)
            raise typer.Exit(130) from None
        if vectors is None:  # another torchrun rank: rank 0 writes the file
            return
        save_vectors(settings.output, vectors)
        finish(settings.output)
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


@app.command(name="eval", no_args_is_help=True)
@options_of(EvalConfig)
def evaluate_command(**options: Any) -> None:
    """Report Recall@k, Precision@1, R-Precision, MAP@R and per-class Recall@1 (FAISS search).

    With a checkpoint and IMAGE_ROOT the images are embedded first (--features, --batch-size,
    --precision, --workers, --device and --channels-last apply to that step).
    """
    with _user_errors():
        settings = resolve(EvalConfig, given(options))
        from ascension_cli.retrieval.report import evaluation_json, retrieval_grid, write_json

        queries, run = _measure(settings)
        from ascension_cli.cli.console import print_evaluation

        print_evaluation(run)
        if settings.json_file is not None:
            write_json(settings.json_file, evaluation_json(
                run.clean, run.searched.class_names, run.recoloured,
                {"queries_file": str(settings.source),
                 "gallery_file": str(settings.gallery) if settings.gallery else None,
                 "model_name": queries.model_name, "feature_kind": queries.feature_kind},
            ))
            console.print(f"metrics written to {settings.json_file}", highlight=False)
        if settings.show:
            picture = retrieval_grid(
                settings.output, run.clean,
                [Path(queries.image_root) / p for p in queries.paths], run.queries.labels,
                [Path(run.searched.image_root) / p for p in run.searched.paths],
                run.searched.labels, run.searched.class_names, queries=settings.show,
                k=min(5, max(settings.ks)),
            )
            console.print(f"retrieval picture written to {picture}", highlight=False)


def _measure(settings: EvalConfig | ReportConfig):
    """The queries, and their evaluation against the gallery (and each recolouring)."""
    from ascension_cli.data.augment import RECOLORINGS
    from ascension_cli.embed.vectors import load_vectors
    from ascension_cli.retrieval.evaluate import evaluate_vectors

    embed_options = dict(feature_kind=settings.features, **settings.run_options())

    def embedded(recolouring: str | None = None):
        what = "embedding" if recolouring is None else f"embedding ({recolouring})"
        return _embed(settings.checkpoint, settings.image_root, what, recolouring=recolouring,
                      split=settings.split, evaluation=True, **embed_options)

    queries = load_vectors(settings.source) if settings.image_root is None else embedded()
    gallery = load_vectors(settings.gallery) if settings.gallery else None
    recoloured = {name: (lambda name=name: embedded(name).vectors) for name in RECOLORINGS
                  } if settings.recolor else None
    with ImageProgress("searching") as progress:
        progress.start(len(queries))
        run = evaluate_vectors(queries, gallery, settings.ks, settings.index, recoloured,
                               on_progress=progress.advance)
    if run.gallery_was_queries:
        console.print("the gallery holds the same images as the queries: searched as one "
                      "set, each query's own vector excluded", highlight=False)
    return queries, run


@app.command(no_args_is_help=True)
@options_of(ReportConfig)
def report(**options: Any) -> None:
    """Write one HTML page showing where retrieval fails: metrics, per-class Recall@1, the
    most-confused class pairs and the worst queries with photos, a map of the embeddings, and
    with a training run folder its curves and options. Self-contained: opens offline.
    """
    with _user_errors():
        settings = resolve(ReportConfig, given(options))
        from ascension_cli.retrieval.html_report import write_report

        _, run = _measure(settings)
        info = write_report(run, settings.output, f"Retrieval report: {settings.source.name}",
                            run_dir=settings.run or settings.run_dir, k=min(5, max(settings.ks)))
        sampled = (f"; the map shows {info.drawn_points} of {info.total_points} vectors"
                   if info.drawn_points < info.total_points else "")
        console.print(f"report written to {info.path} in {info.seconds:.1f} s{sampled}",
                      highlight=False, soft_wrap=True)


@app.command(no_args_is_help=True)
@options_of(IndexConfig)
def index(**options: Any) -> None:
    """Build a searchable catalogue of known items: FAISS index, paths, labels and the model.

    The catalogue folder holds everything `ascension search` needs, the model included.
    """
    with _user_errors():
        settings = resolve(IndexConfig, given(options))
        from ascension_cli.catalog.store import build_catalog

        with ImageProgress("indexing") as progress:
            catalog, added = build_catalog(
                settings.checkpoint, settings.gallery_root, settings.output, add=settings.add,
                split=settings.split, index_kind=settings.kind,
                feature_kind=settings.features, **settings.run_options(),
                on_start=progress.start, on_batch=progress.advance, on_failed=progress.failed,
            )
        console.print(
            f"catalogue {settings.output}: {len(catalog)} items in "
            f"{len(catalog.class_names)} classes ({added} added)", highlight=False,
            soft_wrap=True,
        )
        print_index_info(catalog.index)


@app.command(name="search", no_args_is_help=True)
@options_of(SearchConfig)
def search_command(**options: Any) -> None:
    """Which catalogue item is each photo? Top-k matches and a similarity-weighted vote."""
    with _user_errors():
        settings = resolve(SearchConfig, given(options))
        from ascension_cli.catalog.store import load_catalog, search_catalog
        from ascension_cli.cli.console import print_search
        from ascension_cli.data.folder import list_images
        from ascension_cli.errors import DataError
        from ascension_cli.retrieval.report import write_json

        catalog = load_catalog(settings.catalog, with_vectors=False)
        with ImageProgress("searching") as progress:
            results = search_catalog(
                catalog, list_images(settings.images), settings.k, settings.threshold,
                on_failed=progress.failed, **settings.run_options(), on_start=progress.start,
                on_batch=progress.advance,
            )
        if not results:
            raise DataError("no readable query image")
        print_search(settings.catalog, results)
        if settings.json_file is not None:
            write_json(settings.json_file, {"catalog": str(settings.catalog), "k": settings.k,
                                            "threshold": settings.threshold,
                                            "results": [r.to_dict() for r in results]})
            console.print(f"results written to {settings.json_file}", highlight=False)


@app.command(no_args_is_help=True)
@options_of(ManifestConfig)
def manifest(**options: Any) -> None:
    """Write a manifest (CSV or Parquet) of a class-folder tree: path, label, a seeded per-class
    split (train / validation / test) and query/gallery flags on the test rows. Every command
    that reads a folder reads it too.
    """
    with _user_errors():
        settings = resolve(ManifestConfig, given(options))
        from ascension_cli.data.manifest import describe_rows, manifest_rows, write_manifest

        scan, rows = manifest_rows(settings.data_root, settings.output.parent,
                                   settings.val_fraction, settings.test_fraction, settings.seed)
        write_manifest(settings.output, rows)
        console.print(f"wrote {describe_rows(scan, rows)} to {settings.output}", highlight=False,
                      soft_wrap=True)


@app.command(no_args_is_help=True)
@options_of(ShardConfig)
def shard(**options: Any) -> None:
    """Write WebDataset tar shards of a folder tree or manifest: each image's bytes as they are,
    its class index and label, in a seeded shuffled order; dataset.json lists the classes and
    each shard's count. `train` and `embed` stream them (a folder, a pattern or a URL).
    """
    with _user_errors():
        settings = resolve(ShardConfig, given(options))
        from ascension_cli.data.manifest import scan_any
        from ascension_cli.data.shards import describe_shards, parse_size, write_shards

        scan = scan_any(settings.source, settings.split)
        with ImageProgress("sharding") as progress:
            progress.start(len(scan))
            sidecar = write_shards(scan, settings.output, parse_size(settings.shard_size),
                                   settings.seed, on_image=progress.advance)
        console.print(f"wrote {describe_shards(sidecar, scan)} in {settings.output}",
                      highlight=False, soft_wrap=True)


@app.command(no_args_is_help=True)
@options_of(ExportConfig)
def export(**options: Any) -> None:
    """Export the model: normalised images in, L2-normalised embeddings out, any batch size."""
    with _user_errors():
        settings = resolve(ExportConfig, given(options))
        from ascension_cli.model.export import export_model

        info = export_model(settings.checkpoint, settings.output, settings.format,
                            settings.features, settings.image_size)
        console.print(
            f"wrote {info['format']} model to {info['path']}: input (batch, 3, "
            f"{info['image_size']}, {info['image_size']}) normalised with mean {info['mean']} "
            f"std {info['std']}; output (batch, {info['embedding_dim']}) L2-normalised",
            highlight=False, soft_wrap=True,
        )


@app.command(no_args_is_help=True)
@options_of(ServeConfig)
def serve(**options: Any) -> None:
    """Serve a catalogue over HTTP: a web page at / to drop or take a photo, and a JSON API
    (POST /search, GET /items/ID/image, /info, /healthz). Binds to 127.0.0.1 unless --host says
    otherwise.
    """
    import importlib.util

    with _user_errors():
        settings = resolve(ServeConfig, given(options))
        missing = [m for m in ("fastapi", "uvicorn", "multipart")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise AscensionError(f"serve needs {', '.join(missing)}, which is not installed: "
                                 'pip install "ascension-cli[serve]"')
        import json
        import os

        import uvicorn

        from ascension_cli.serve.app import SETTINGS_VARIABLE, create_app

        console.print(f"serving {settings.catalog} on http://{settings.host}:{settings.port}/ "
                      f"({settings.workers} process(es); writes "
                      f"{'on' if settings.allow_writes else 'off'}; Ctrl-C stops)",
                      highlight=False, soft_wrap=True)
        if settings.workers == 1:
            uvicorn.run(create_app(settings.catalog, **settings.app_options()),
                        host=settings.host, port=settings.port, log_level="warning")
            return
        os.environ[SETTINGS_VARIABLE] = json.dumps(
            {"catalog": str(settings.catalog), **settings.app_options()})
        uvicorn.run("ascension_cli.serve.app:app_from_environment", factory=True,
                    workers=settings.workers, host=settings.host, port=settings.port,
                    log_level="warning")


def main() -> None:
    """Console-script entry point."""
    # File names need not be UTF-8; print what cannot be encoded as escapes, never crash on it.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        app()
    except AscensionError as exc:  # raised outside a command's guard (should not happen)
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
