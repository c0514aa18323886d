"""Manifests, shards, export and the demo from Python, as the commands of the same names do
them (the command line calls the ``run_*`` functions)."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascension_cli.config import DemoConfig, ExportConfig, ManifestConfig, ShardConfig, resolve

if TYPE_CHECKING:
    from ascension_cli.data.folder import FolderScan
    from ascension_cli.progress import Progress
    from ascension_cli.train.reporter import Reporter


@dataclass
class Written:
    """What a manifest or shard run wrote, and of what."""

    scan: FolderScan
    output: Path
    description: str  # "N images of C classes ..." as the command prints it


def run_manifest(settings: ManifestConfig) -> Written:
    from ascension_cli.data.manifest import describe_rows, manifest_rows, write_manifest

    scan, rows = manifest_rows(settings.data_root, settings.output.parent,
                               settings.val_fraction, settings.test_fraction, settings.seed)
    write_manifest(settings.output, rows)
    return Written(scan, settings.output, describe_rows(scan, rows))


def manifest(data_root: str | Path, output: str | Path, **options: Any) -> Written:
    """Write a manifest of a class-folder tree, as ``ascension manifest``; ``options``:
    val_fraction, test_fraction, seed."""
    return run_manifest(resolve(ManifestConfig, dict(options, data_root=data_root,
                                                     output=output)))


def run_shard(settings: ShardConfig, progress: Progress | None = None) -> Written:
    from ascension_cli.config.fields import parse_size
    from ascension_cli.data.manifest import scan_any
    from ascension_cli.data.shards import describe_shards, write_shards
    from ascension_cli.progress import Progress

    progress = progress or Progress()
    scan = scan_any(settings.source, settings.split)
    progress.start(len(scan))
    sidecar = write_shards(scan, settings.output, parse_size(settings.shard_size), settings.seed,
                           on_image=progress.advance)
    return Written(scan, settings.output, describe_shards(sidecar, scan))


def shard(source: str | Path, output: str | Path, progress: Progress | None = None,
          **options: Any) -> Written:
    """Write WebDataset shards of a folder or manifest, as ``ascension shard``; ``options``:
    split, shard_size, seed."""
    return run_shard(resolve(ShardConfig, dict(options, source=source, output=output)),
                     progress)


def run_export(settings: ExportConfig) -> dict[str, Any]:
    from ascension_cli.model.export import export_model

    return export_model(settings.checkpoint, settings.output, settings.format,
                        settings.features, settings.image_size)


def export(checkpoint: str | Path, output: str | Path, **options: Any) -> dict[str, Any]:
    """Export a checkpoint's model (ONNX or TorchScript), as ``ascension export``; returns its
    format, path, input size, normalisation and embedding size."""
    return run_export(resolve(ExportConfig, dict(options, checkpoint=checkpoint,
                                                 output=output)))


def run_demo(settings: DemoConfig, reporter: Reporter | None = None) -> tuple[float, float]:
    """The digits demo; validation recall@1 before and after training."""
    from ascension_cli.demo import run_demo as demo_run
    from ascension_cli.train.reporter import Reporter

    folder = (tempfile.TemporaryDirectory(prefix="ascension-demo-")
              if settings.workdir is None else nullcontext(settings.workdir))
    with folder as where:
        return demo_run(Path(where), settings.epochs, settings.workers, reporter or Reporter())


def demo(**options: Any) -> tuple[float, float]:
    """``ascension demo``: train on the bundled digits; recall@1 before and after."""
    return run_demo(resolve(DemoConfig, options))
