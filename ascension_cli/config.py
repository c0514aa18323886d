"""Pydantic models for every command's options: the single source of defaults and validation.

A config file (YAML or TOML) supplies defaults, command-line options override it, and the merged
result is validated once, so a mistyped key or an out-of-range value stops the run before any work.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ascension_cli import paths
from ascension_cli.errors import ConfigError

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Accumulation = Literal["cache", "naive"]
Augment = Literal["color-agnostic", "standard", "none"]
Head = Literal["none", "mlp", "linear"]
LrScaling = Literal["linear", "sqrt", "none"]
Tracker = Literal["tensorboard", "mlflow", "none"]
ConfigT = TypeVar("ConfigT", bound=BaseModel)

# Path options, each checked by paths.py before any work (one line, exit 2 when wrong).
Folder = Annotated[Path, AfterValidator(paths.existing_folder)]
ImageSource = Annotated[Path, AfterValidator(paths.image_source)]
StreamSource = Annotated[Path | str, BeforeValidator(paths.images_or_shards)]
FileOrFolder = Annotated[Path, AfterValidator(paths.existing_file_or_folder)]
OutputFile = Annotated[Path, AfterValidator(paths.output_file)]
OutputFolder = Annotated[Path, AfterValidator(paths.output_folder)]
WeightsFile = Annotated[Path, AfterValidator(paths.existing_file)]
CheckpointFile = Annotated[Path, AfterValidator(paths.checkpoint_file)]
VectorsFile = Annotated[Path, AfterValidator(paths.vectors_file)]
CatalogFolder = Annotated[Path, AfterValidator(paths.catalog_folder)]
# Fields given as positional arguments: messages spell them as the help does (DATA_ROOT).
POSITIONAL = {"data_root", "checkpoint", "image_root", "source", "gallery_root", "catalog",
              "images"}

# --lr is the learning rate of a step over this many images (a plain loop's batch size).
LR_REFERENCE_BATCH = 32
# Warmup when --warmup-epochs is not given: this share of all optimizer steps.
WARMUP_SHARE = 0.05

# Options a resume may change (where and how fast it runs, not what it learns; channels_last and
# compile change only the order of floating-point operations) carry this mark.
RESUMABLE = {"resume_may_change": True}
SHORT_O = {"flags": ["--output", "-o"]}
WORKERS_HELP = ("Data-loading processes. (default: one per core up to 8 on a GPU; on the CPU one "
                "per 8 cores, as the model's threads use them all)")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps."
CHANNELS_LAST_HELP = ("Run the model on NHWC weights and images: faster convolutions (up to 1.8x "
                      "measured on the CPU), same results up to rounding.")

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class TrainConfig(BaseModel):
    """Options of ``ascension train``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data_root: StreamSource = Field(
        description="Folder of class folders (DATA_ROOT/<class>/<image>); a manifest (.csv, "
        ".parquet) of path, label and optional split: its train rows train, its validation "
        "rows validate, its test rows are never read; or shards from `ascension shard` (their "
        "folder, a pattern like shards/shard-{000000..000127}.tar, or a URL), streamed.",
        json_schema_extra=RESUMABLE)
    batch_size: int = Field(16, ge=1, description="Images per micro-batch: what fits in memory.")
    target_batch: int = Field(
        128, ge=2, description="Images per optimizer step, and the batch SupCon contrasts (a "
        "multiple of --batch-size)."
    )
    epochs: int = Field(50, ge=1, description="Epochs.", json_schema_extra=RESUMABLE)
    warmup_epochs: float | None = Field(
        None, ge=0, description="Linear LR warmup in epochs, then cosine decay. (default: "
        f"{WARMUP_SHARE:.0%} of the run's optimizer steps)"
    )
    lr: float = Field(
        3e-4, gt=0, le=10,
        description=f"Peak learning rate for {LR_REFERENCE_BATCH} images per step; --lr-scaling "
        f"turns it into the step's LR (linear: x --target-batch/{LR_REFERENCE_BATCH}).",
    )
    lr_scaling: LrScaling = Field("linear", description="How --lr follows --target-batch.")
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=1,
        description="The backbone's LR as a share of the head's, with --head mlp or linear.",
    )
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    temperature: float = Field(0.1, gt=0, le=10, description="SupCon temperature.")
    model: str = Field("tf_efficientnetv2_m", min_length=1, description="Any timm model name.")
    image_size: int | None = Field(
        None, ge=16, le=4096,
        description="Square input size. (default: the model's pretrained input size)",
    )
    embedding_dim: int = Field(
        128, ge=2, le=65536, description="Projection head output size, with --head mlp or linear."
    )
    head: Head = Field(
        "none", description="What the loss trains: none (the pooled backbone features, which "
        "retrieval uses), or an mlp or linear projection head on them."
    )
    pretrained: bool = Field(
        True, description="Start from timm's pretrained weights (downloaded or cached)."
    )
    weights: WeightsFile | None = Field(
        None, description="Local timm-format weights (.safetensors/.pth); works offline."
    )
    precision: Precision = Field(
        "auto", description="auto: bf16 on Ampere+ GPUs and bf16-capable CPUs, fp16 with loss "
        "scaling on older GPUs, else fp32."
    )
    accumulation: Accumulation = Field(
        "cache", description="cache: gradient caching, the loss sees the whole --target-batch. "
        "naive: plain accumulation, the loss sees each micro-batch alone."
    )
    views: int = Field(2, ge=1, le=16, description="Augmented views per image.")
    samples_per_class: int = Field(4, ge=1, description="Images per class in each target batch.")
    augment: Augment = Field(
        "color-agnostic", description="color-agnostic: colour destroyed or randomised, so the "
        "same item in another colour lands close. standard: SimCLR. none."
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of each class held out for validation."
    )
    val_root: ImageSource | None = Field(
        None, description="A separate validation tree, or a manifest (its validation rows when "
        "it has a split column), with the training classes."
    )
    workers: int | None = Field(None, ge=0, le=256, description=WORKERS_HELP,
                                json_schema_extra=RESUMABLE)
    seed: int = Field(0, ge=0, description="Random seed.")
    device: str = Field("auto", description=DEVICE_HELP, json_schema_extra=RESUMABLE)
    save_dir: OutputFolder = Field(
        Path("checkpoints"),
        description="Where last.pt, best.pt, metrics.jsonl, training.png and config.yaml go.",
        json_schema_extra=RESUMABLE,
    )
    resume: str | None = Field(
        None, description="'auto' continues from SAVE_DIR/last.pt if it exists; or a PATH.",
        json_schema_extra=RESUMABLE,
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.",
                                  json_schema_extra=RESUMABLE)
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this.")
    sync_bn: bool = Field(
        False, description="Under DDP, BatchNorm statistics over all processes."
    )
    max_image_pixels: int = Field(
        100_000_000, ge=1,
        description="Refuse images with more pixels than this (decompression bombs).",
    )
    max_nonfinite: int = Field(
        20, ge=1,
        description="Stop after this many non-finite losses in a row (each skips its step).",
    )
    channels_last: bool = Field(True, description=CHANNELS_LAST_HELP, json_schema_extra=RESUMABLE)
    shuffle_buffer: int = Field(
        8192, ge=16, description="With shards: encoded images each loader process holds to draw "
        "class-balanced batches from (more mixes better and costs memory).")
    cache_images: bool = Field(
        False, description="Decode each image once, keep it in memory with its short side at "
        "twice the input size, for datasets that fit in RAM (refused past 60% of free memory)."
    )
    compile: bool = Field(
        False, description="torch.compile the model: the first steps compile it (minutes), "
        "later ones may run faster on a GPU. Measured no gain on the CPU.",
        json_schema_extra=RESUMABLE,
    )
    tracker: list[Tracker] = Field(
        default_factory=list, description="Log to an experiment tracker; repeat for several. "
        'tensorboard: SAVE_DIR/tensorboard (pip install "ascension-cli[tensorboard]"). mlflow: '
        'SAVE_DIR/mlruns or --tracking-uri (pip install "ascension-cli[mlflow]").',
        json_schema_extra=RESUMABLE,
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store. (default: SAVE_DIR/mlruns)",
        json_schema_extra=RESUMABLE,
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.match(value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("resume")
    @classmethod
    def _check_resume(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            paths.checkpoint_file(Path(value))
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.target_batch % self.batch_size:
            raise ValueError(
                f"--target-batch ({self.target_batch}) must be a multiple of "
                f"--batch-size ({self.batch_size})"
            )
        if self.samples_per_class > self.target_batch:
            raise ValueError(
                f"--samples-per-class ({self.samples_per_class}) cannot exceed "
                f"--target-batch ({self.target_batch})"
            )
        if self.warmup_epochs is not None and self.warmup_epochs > self.epochs:
            raise ValueError(
                f"--warmup-epochs ({self.warmup_epochs}) cannot exceed --epochs ({self.epochs})"
            )
        if self.views == 1 and self.samples_per_class == 1:
            raise ValueError(
                "with --views 1, --samples-per-class must be at least 2, "
                "or no anchor has a positive"
            )
        if self.head == "none":
            for field in ("embedding_dim", "backbone_lr_scale"):
                if field in self.model_fields_set:
                    raise ValueError(
                        f"{option_name(field)} applies to a projection head; with --head none "
                        "the loss trains the backbone's pooled features themselves: give "
                        f"--head mlp or linear, or drop {option_name(field)}"
                    )
        if self.val_root is not None and "val_fraction" in self.model_fields_set:
            raise ValueError("give either --val-root or --val-fraction, not both")
        return self


Features = Literal["backbone", "head"]
Split = Literal["train", "validation", "test"]


def _split_field() -> Any:
    return Field(None, description="With a manifest: only its rows of this split.")
IndexKind = Literal["flat", "hnsw", "ivf", "ivfpq"]


def _features_field() -> Any:
    return Field("backbone", description="backbone: the pooled trunk features, which training "
                 "shapes and retrieval uses. head: the projection head's output.")


def _image_size_field() -> Any:
    return Field(None, ge=16, le=4096, description="Input size. (default: the checkpoint's)")


class _RunOptions(BaseModel):
    """Options shared by the commands that run a model over images."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(64, ge=1, description="Images per batch.")
    precision: Precision = Field("auto", description="Arithmetic of the forward pass.")
    workers: int | None = Field(None, ge=0, le=256, description=WORKERS_HELP)
    device: str = Field("auto", description=DEVICE_HELP)
    channels_last: bool = Field(True, description=CHANNELS_LAST_HELP)

    _check_device = field_validator("device")(TrainConfig._check_device.__func__)

    def run_options(self) -> dict[str, Any]:
        """The keyword arguments of ``embedding.embed_images`` these options set."""
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
    split: Split | None = _split_field()
    features: Features = _features_field()
    output: OutputFile = Field(Path("vectors.npz"), description="Vectors file to write (.npz).",
                               json_schema_extra=SHORT_O)
    image_size: int | None = _image_size_field()
    index: OutputFile | None = Field(
        None, description="Also write a FAISS index of the vectors to this file."
    )
    chunk_size: int = Field(
        4096, ge=1, description="Images per chunk: each is kept in OUTPUT.parts/ as it "
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
    split: Split | None = _split_field()
    features: Features = _features_field()
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
        best = self.run_dir / "best.pt"
        return best if best.is_file() else self.run_dir / "last.pt"

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
        _check_path(check, self.checkpoint, "source")
        return self


class EvalConfig(_MeasureOptions):
    """Options of ``ascension eval``."""

    json_file: OutputFile | None = Field(None, description="Write the metrics to this JSON file.",
                                         json_schema_extra={"flags": ["--json"]})
    show: int | None = Field(
        None, ge=1, le=200, description="Draw this many queries with their top-k results."
    )
    output: OutputFile = Field(Path("retrieval.png"), description="Picture for --show.",
                               json_schema_extra=SHORT_O)


class ReportConfig(_MeasureOptions):
    """Options of ``ascension report``."""

    output: OutputFile = Field(Path("report.html"), description="The HTML file to write.",
                               json_schema_extra=SHORT_O)
    run: Folder | None = Field(
        None, description="A training run folder whose curves and options to show. (default: "
        "SOURCE, when it is one)"
    )


class IndexConfig(_RunOptions):
    """Options of ``ascension index``."""

    checkpoint: CheckpointFile = Field(description="A checkpoint from `ascension train`.")
    gallery_root: ImageSource = Field(
        description="The known items: class folders, a flat image folder, or a manifest."
    )
    split: Split | None = _split_field()
    features: Features = _features_field()
    output: OutputFolder = Field(description="Catalogue folder to write.",
                                 json_schema_extra=SHORT_O)
    add: bool = Field(
        False, description="Append the images the catalogue does not hold yet, without "
        "re-embedding the others (same checkpoint required)."
    )
    kind: IndexKind | None = Field(
        None, description="The FAISS index. flat: exact, 4 x dimension bytes a vector. ivfpq: "
        "inverted lists of compressed codes (a few dozen bytes a vector), for millions of items. "
        "hnsw: a graph over the full vectors, fast and accurate, more memory. ivf: lists of full "
        "vectors. Lists, probes and code size follow the catalogue's size; the recall against "
        "exact search is measured on held-out items. (default: flat; with --add, the "
        "catalogue's)")

    @model_validator(mode="after")
    def _check_catalog(self) -> IndexConfig:
        if self.add:
            _check_path(paths.catalog_folder, self.output, "output")
        return self


class SearchConfig(_RunOptions):
    """Options of ``ascension search``."""

    catalog: CatalogFolder = Field(description="A catalogue folder from `ascension index`.")
    images: list[FileOrFolder] = Field(min_length=1,
                                       description="Query images, or folders of them.")
    k: int = Field(5, ge=1, le=1000, description="Matches per query.")
    threshold: float | None = Field(
        None, ge=-1, le=1, description="Cosine similarity the best match must reach; below it "
        "the query is 'unknown'."
    )
    json_file: OutputFile | None = Field(None, description="Write the results to this JSON file.",
                                         json_schema_extra={"flags": ["--json"]})


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
    split: Split | None = _split_field()
    seed: int = Field(0, ge=0, description="Seed of the shuffled order the images are written in.")

    @field_validator("shard_size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        from ascension_cli.data.shards import parse_size

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
    features: Features = _features_field()
    image_size: int | None = _image_size_field()


class ServeConfig(BaseModel):
    """Options of ``ascension serve``."""

    model_config = ConfigDict(extra="forbid")

    catalog: CatalogFolder = Field(description="A catalogue folder from `ascension index`.")
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on; 0.0.0.0 "
                      "opens the service to the network (put it behind a reverse proxy).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free one).")
    batch_size: int = Field(64, ge=1, description="Images per forward pass.")
    precision: Precision = Field("auto", description="Arithmetic of the forward pass.")
    device: str = Field("auto", description=DEVICE_HELP)
    channels_last: bool = Field(True, description=CHANNELS_LAST_HELP)
    batch_window_ms: float = Field(
        5.0, ge=0, le=1000, description="How long a request waits for others to share its "
        "forward pass.")
    max_upload_mb: float = Field(50.0, gt=0, description="Largest upload accepted, in MB.")
    max_image_pixels: int = Field(
        100_000_000, ge=1, description="Refuse images with more pixels than this.")
    workers: int = Field(1, ge=1, le=64, description="Server processes, each with the model "
                         "loaded (on a GPU keep 1: batching already fills it).")
    allow_writes: bool = Field(False, description="Accept POST /items, which adds photos to the "
                               "catalogue; needs --token.")
    token: str | None = Field(None, min_length=12, description="The secret POST /items must "
                              "send as 'Authorization: Bearer TOKEN' (12 characters or more).")

    _check_device = field_validator("device")(TrainConfig._check_device.__func__)

    @model_validator(mode="after")
    def _check_writes(self) -> ServeConfig:
        if self.allow_writes != (self.token is not None):
            raise ValueError("writes need both --allow-writes and --token (the one without the "
                             "other does nothing)")
        return self

    def run_options(self) -> dict[str, Any]:
        """The keyword arguments of ``embedding.embed_images`` these options set."""
        return {"batch_size": self.batch_size, "precision": self.precision, "workers": 0,
                "device": self.device, "channels_last": self.channels_last}

    def app_options(self) -> dict[str, Any]:
        """The keyword arguments of ``serve.create_app``."""
        return {"run_options": self.run_options(), "max_pixels": self.max_image_pixels,
                "max_upload_bytes": int(self.max_upload_mb * 1e6),
                "batch_window": self.batch_window_ms / 1000,
                "token": self.token if self.allow_writes else None}


class DemoConfig(BaseModel):
    """Options of ``ascension demo``."""

    model_config = ConfigDict(extra="forbid")

    workdir: OutputFolder | None = Field(
        None, description="Where the demo dataset and checkpoints go. (default: a temp folder)"
    )
    epochs: int = Field(5, ge=1, description="Training epochs (about 2.5 s each on 2 cores).")
    workers: int = Field(0, ge=0, le=256, description="Data-loading processes.")


def _check_path(check: Callable[[Path], Path], path: Path, field: str) -> None:
    """A path check that depends on other options, with its message naming the option."""
    try:
        check(path)
    except ValueError as exc:
        raise ValueError(f"invalid {option_name(field)}: {exc}") from None


def resume_may_change() -> set[str]:
    """Training options a resume may change: those marked RESUMABLE."""
    return {name for name, field in TrainConfig.model_fields.items()
            if (field.json_schema_extra or {}).get("resume_may_change")}


def option_name(field: str) -> str:
    """The command-line spelling of a config field: DATA_ROOT for an argument, else --option."""
    return field.upper() if field in POSITIONAL else "--" + field.replace("_", "-")


def _describe(error: dict[str, Any], file_keys: set[str], config_file: Path | None) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else ""
    if error.get("type") == "extra_forbidden":
        where = f" in config file {config_file}" if config_file else ""
        return f"unknown option '{field}'{where}"
    message = error.get("msg", "invalid value")
    message = message.removeprefix("Value error, ")
    if not field:
        return message
    source = f" (from {config_file})" if config_file and field in file_keys else ""
    given = error.get("input")
    given = str(given) if isinstance(given, Path) else given
    shown = (f" (got {given!r})" if given is not None and not isinstance(given, (dict, list))
             and str(given) not in message else "")
    return f"invalid {option_name(field)}{source}: {message}{shown}"


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or TOML file of options; keys may use dashes or underscores."""
    try:
        paths.existing_file(path)
    except ValueError as exc:
        raise ConfigError(f"config {exc}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise ConfigError(f"cannot parse config file {path}: {why}") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ConfigError(f"cannot parse config file {path}: {first_line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def resolve(
    model: type[ConfigT], cli_values: dict[str, Any], config_file: Path | None = None
) -> ConfigT:
    """Merge a config file (defaults) with command-line values (which win) and validate once.

    ``cli_values`` holds only options the user gave: ``None`` means "not given".
    """
    file_values = read_config_file(config_file) if config_file else {}
    merged = dict(file_values)
    merged.update({key: value for key, value in cli_values.items() if value is not None})
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], set(file_values), config_file)) from None


def to_plain(config: BaseModel) -> dict[str, Any]:
    """The config as JSON/YAML-friendly values (paths as strings)."""
    return config.model_dump(mode="json")
