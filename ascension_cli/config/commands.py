"""The options of the commands that embed, measure and move data: embed, eval, report,
manifest, shard, export and demo (``train``'s are in ``train``, the catalogue's in
``catalogue``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ascension_cli import paths
from ascension_cli.config.fields import (
    CHANNELS_LAST_HELP,
    DEVICE_HELP,
    SHORT_O,
    WORKERS_HELP,
    CheckpointFile,
    Features,
    Folder,
    ImageSource,
    IndexKind,
    OutputFile,
    OutputFolder,
    Precision,
    Split,
    StreamSource,
    VectorsFile,
    check_device,
    check_path,
    features_field,
    held_out_seed_field,
    image_size_field,
    split_field,
    target_fmr_field,
    unknown_classes_field,
)
from ascension_cli.formats import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    PARTS_CHUNK,
)


class _RunOptions(BaseModel):
    """Options shared by the commands that run a model over images."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(64, ge=1, description="Images per batch.")
    precision: Precision = Field("auto", description="Arithmetic of the forward pass.")
    workers: int | None = Field(None, ge=0, le=256, description=WORKERS_HELP)
    device: str = Field("auto", description=DEVICE_HELP)
    channels_last: bool = Field(True, description=CHANNELS_LAST_HELP)

    _check_device = field_validator("device")(check_device)

    def run_options(self) -> dict[str, Any]:
        """The ``embed.pipeline.EmbedOptions`` these options set, as keywords."""
        return {
            "batch_size": self.batch_size, "precision": self.precision, "workers": self.workers,
            "device": self.device, "channels_last": self.channels_last,
        }


class EmbedConfig(_RunOptions):
    """Options of ``ascension embed``."""

    checkpoint: CheckpointFile = Field(description="A checkpoint from `ascension train`.")
    image_root: StreamSource = Field(
        description="Class folders (IMAGE_ROOT/<class>/<image>), a flat image folder, a "
        "manifest (.csv, .parquet), or shards from `ascension shard` (folder, pattern or URL)."
    )
    split: Split | None = split_field()
    features: Features = features_field()
    output: OutputFile = Field(Path("vectors.npz"), description="Vectors file to write (.npz).",
                               json_schema_extra=SHORT_O)
    image_size: int | None = image_size_field()
    index: OutputFile | None = Field(
        None, description="Also write a FAISS index of the vectors to this file."
    )
    chunk_size: int = Field(
        PARTS_CHUNK, ge=1, description="Images per chunk: each is kept in OUTPUT.parts/ as it "
        "finishes, so an interrupted run resumes from the last one; under torchrun the chunks "
        "are shared among the processes. With shards, a chunk is a shard.")


class _MeasureOptions(_RunOptions):
    """What ``eval`` and ``report`` measure: vectors, or a checkpoint (or a training run folder)
    with images to embed first, against a gallery or among themselves."""

    source: Path = Field(description="A vectors file from `ascension embed`; or a checkpoint, or "
                         "a training run folder (its best.pt), then give IMAGE_ROOT too, and it "
                         "is embedded first.")
    image_root: ImageSource | None = Field(
        None, description="Images to embed (a folder or a manifest), with a checkpoint or run "
        "folder as SOURCE. A manifest with is_query / is_gallery columns is measured by its "
        "query/gallery protocol: only flagged rows are embedded."
    )
    split: Split | None = split_field()
    features: Features = features_field()
    gallery: VectorsFile | None = Field(
        None, description="A vectors file to search in; without it the queries are searched "
        "among themselves, each query's own vector excluded."
    )
    k: str = Field("1,5,10", description="Recall@k cut-offs.")
    index: IndexKind = Field(
        "flat", description="flat: exact. hnsw, ivf, ivfpq: approximate, for galleries past "
        "about a million vectors (ivfpq: 10,000 or more)."
    )
    recolor: bool = Field(
        False, description="With a checkpoint: also embed the queries hue-rotated (90, 180 "
        "degrees) and in grayscale, search them where the clean queries were searched (the "
        "--gallery, if given), and report Recall@k for each."
    )

    @field_validator("k")
    @classmethod
    def _check_k(cls, value: str) -> str:
        try:
            ks = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError("must be comma-separated whole numbers, like 1,5,10") from None
        if not ks or min(ks) < 1:
            raise ValueError("must be comma-separated whole numbers of 1 or more, like 1,5,10")
        return ",".join(str(k) for k in sorted(set(ks)))

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.k.split(","))

    @property
    def run_dir(self) -> Path | None:
        """The training run folder SOURCE names, if it names one."""
        return self.source if self.source.is_dir() else None

    @property
    def checkpoint(self) -> Path:
        """The checkpoint to embed with: SOURCE, or a run folder's best.pt (else last.pt)."""
        if self.run_dir is None:
            return self.source
        best = self.run_dir / BEST_CHECKPOINT
        return best if best.is_file() else self.run_dir / LAST_CHECKPOINT

    @model_validator(mode="after")
    def _check_sources(self) -> _MeasureOptions:
        if self.recolor and self.image_root is None:
            raise ValueError("--recolor needs a checkpoint and IMAGE_ROOT (it re-embeds images)")
        if self.image_root is None and (self.source.suffix in (".pt", ".pth")
                                        or self.source.is_dir()):
            raise ValueError("a checkpoint or run folder as SOURCE needs IMAGE_ROOT too: "
                             "ascension eval CHECKPOINT IMAGE_ROOT")
        # A checkpoint with IMAGE_ROOT (embedded first), else a vectors file.
        check = paths.vectors_file if self.image_root is None else paths.checkpoint_file
        check_path(check, self.checkpoint, "source")
        return self


class _OpenSetOptions(BaseModel):
    """The open-set measurement ``eval`` reports and ``report`` draws."""

    unknown_classes: float | None = unknown_classes_field(
        "Also measure the open set: hold out this share of the classes (seeded), their photos "
        "out of the gallery and their queries unknown (with --gallery, queries of classes it "
        "lacks are unknown too), and report over thresholds the unknowns accepted (FMR), the "
        "known refused (FNMR), Recall@1 of the accepted, the ROC AUC and the threshold for "
        "--target-fmr.")
    target_fmr: float = target_fmr_field("The share of unknown queries a threshold may accept "
                                         "(with --unknown-classes).")
    seed: int = held_out_seed_field()

    @model_validator(mode="after")
    def _open_set_given(self):
        """--target-fmr and --seed choose what --unknown-classes measures: alone, they would
        be ignored."""
        alone = sorted({"target_fmr", "seed"} & self.model_fields_set)
        if alone and self.unknown_classes is None:
            raise ValueError(f"--{alone[0].replace('_', '-')} applies to the open-set "
                             "measurement: give --unknown-classes too")
        return self


class EvalConfig(_MeasureOptions, _OpenSetOptions):
    """Options of ``ascension eval``."""

    json_file: OutputFile | None = Field(None, description="Write the metrics to this JSON file.",
                                         json_schema_extra={"flags": ["--json"]})
    show: int | None = Field(
        None, ge=1, le=200, description="Draw this many queries with their top-k results."
    )
    output: OutputFile = Field(Path("retrieval.png"), description="Picture for --show.",
                               json_schema_extra=SHORT_O)


class ReportConfig(_MeasureOptions, _OpenSetOptions):
    """Options of ``ascension report``."""

    output: OutputFile = Field(Path("report.html"), description="The HTML file to write.",
                               json_schema_extra=SHORT_O)
    run: Folder | None = Field(
        None, description="A training run folder whose curves and options to show. (default: "
        "SOURCE, when it is one)"
    )


class ManifestConfig(BaseModel):
    """Options of ``ascension manifest``."""

    model_config = ConfigDict(extra="forbid")

    data_root: Folder = Field(description="Folder of class folders: DATA_ROOT/<class>/<image>.")
    output: OutputFile = Field(Path("manifest.csv"), description="Manifest to write: .csv, or "
                               ".parquet (needs pyarrow).", json_schema_extra=SHORT_O)
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of each class marked "
                                "split=validation.")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Share of each class marked "
                                 "split=test, is_query=1, is_gallery=1 (the test images are "
                                 "searched among themselves).")
    seed: int = Field(0, ge=0, description="Seed of the per-class split.")

    @field_validator("output")
    @classmethod
    def _check_suffix(cls, value: Path) -> Path:
        if value.suffix.lower() not in paths.MANIFEST_SUFFIXES:
            raise ValueError("must end in .csv or .parquet")
        return value

    @model_validator(mode="after")
    def _check_fractions(self) -> ManifestConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("--val-fraction and --test-fraction together must leave some "
                             "training images (their sum is 1 or more)")
        return self


class ShardConfig(BaseModel):
    """Options of ``ascension shard``."""

    model_config = ConfigDict(extra="forbid")

    source: ImageSource = Field(description="Class folders, or a manifest (.csv, .parquet).")
    output: OutputFolder = Field(description="Folder to write the shards and dataset.json to.",
                                 json_schema_extra=SHORT_O)
    shard_size: str = Field("1GB", description="Largest shard, like 1GB, 500MB or 64MiB.")
    split: Split | None = split_field()
    seed: int = Field(0, ge=0, description="Seed of the shuffled order the images are written in.")

    @field_validator("shard_size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        from ascension_cli.config.fields import parse_size

        if parse_size(value) < 1:
            raise ValueError("must be at least 1 byte")
        return value

    @model_validator(mode="after")
    def _check_output(self) -> ShardConfig:
        if self.output.is_dir() and any(self.output.glob("*.tar")):
            raise ValueError(f"{self.output} already holds shards: choose another --output or "
                             "empty it first")
        return self


class ExportConfig(BaseModel):
    """Options of ``ascension export``."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: CheckpointFile = Field(description="A checkpoint from `ascension train`.")
    format: Literal["onnx", "torchscript"] = Field("onnx", description="File format.")
    output: OutputFile = Field(description="File to write.", json_schema_extra=SHORT_O)
    features: Features = features_field()
    image_size: int | None = image_size_field()


class DemoConfig(BaseModel):
    """Options of ``ascension demo``."""

    model_config = ConfigDict(extra="forbid")

    workdir: OutputFolder | None = Field(
        None, description="Where the demo dataset and checkpoints go. (default: a temp folder)"
    )
    epochs: int = Field(5, ge=1, description="Training epochs (about 2.5 s each on 2 cores).")
    workers: int = Field(0, ge=0, le=256, description="Data-loading processes.")

