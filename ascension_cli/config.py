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
ConfigT = TypeVar("ConfigT", bound=BaseModel)

# Path options, each checked by paths.py before any work (one line, exit 2 when wrong).
Folder = Annotated[Path, AfterValidator(paths.existing_folder)]
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

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class TrainConfig(BaseModel):
    """Options of ``ascension train``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data_root: Folder
    batch_size: int = Field(16, ge=1, description="Images per micro-batch (what fits in memory).")
    target_batch: int = Field(
        128, ge=2, description="Images per optimizer step: the contrastive batch SupCon sees."
    )
    epochs: int = Field(50, ge=1)
    warmup_epochs: float | None = Field(
        None, ge=0, description="Linear LR warmup in epochs; none given: WARMUP_SHARE of the "
        "optimizer steps."
    )
    lr: float = Field(
        3e-4, gt=0, le=10,
        description="Peak learning rate for LR_REFERENCE_BATCH images per step; --lr-scaling "
        "adapts it to --target-batch.",
    )
    lr_scaling: LrScaling = Field(
        "linear", description="How --lr follows --target-batch: linear, sqrt, or none."
    )
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=1, description="The pretrained backbone's LR as a share of --lr."
    )
    weight_decay: float = Field(0.05, ge=0)
    temperature: float = Field(0.1, gt=0, le=10)
    model: str = Field("tf_efficientnetv2_m", min_length=1)
    image_size: int | None = Field(None, ge=16, le=4096)
    embedding_dim: int = Field(128, ge=2, le=65536)
    head: Head = Field(
        "none", description="Projection head trained by the loss: none (the pooled features "
        "themselves, what retrieval uses), mlp or linear."
    )
    pretrained: bool = True
    weights: WeightsFile | None = None
    precision: Precision = "auto"
    accumulation: Accumulation = "cache"
    views: int = Field(2, ge=1, le=16)
    samples_per_class: int = Field(4, ge=1)
    augment: Augment = "color-agnostic"
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_root: Folder | None = None
    workers: int | None = Field(
        None, ge=0, le=256,
        description="Data-loading processes; none given: by device (see runtime.resolve_workers).",
    )
    seed: int = Field(0, ge=0)
    device: str = "auto"
    save_dir: OutputFolder = Path("checkpoints")
    resume: str | None = None
    max_steps: int | None = Field(None, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    sync_bn: bool = False
    max_image_pixels: int = Field(
        100_000_000, ge=1, description="Images larger than this are refused before decoding."
    )
    max_nonfinite: int = Field(
        20, ge=1, description="Consecutive non-finite losses after which training aborts."
    )
    channels_last: bool = Field(
        True, description="NHWC weights and batches: faster convolutions on CPU and GPU."
    )
    cache_images: bool = Field(
        False, description="Decode every image once, at twice the input size, and keep it in RAM."
    )
    compile: bool = Field(False, description="torch.compile the model for training.")

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
IndexKind = Literal["flat", "hnsw", "ivf"]


class _RunOptions(BaseModel):
    """Options shared by the commands that run a model over images."""

    model_config = ConfigDict(extra="forbid")

    features: Features = "backbone"
    batch_size: int = Field(64, ge=1)
    precision: Precision = "auto"
    workers: int | None = Field(None, ge=0, le=256)
    device: str = "auto"
    channels_last: bool = True

    _check_device = field_validator("device")(TrainConfig._check_device.__func__)

    def run_options(self) -> dict[str, Any]:
        """The keyword arguments of ``embed.embed_images`` these options set."""
        return {
            "batch_size": self.batch_size, "precision": self.precision, "workers": self.workers,
            "device": self.device, "channels_last": self.channels_last,
        }


class EmbedConfig(_RunOptions):
    """Options of ``ascension embed``."""

    checkpoint: CheckpointFile
    image_root: Folder
    output: OutputFile = Path("vectors.npz")
    image_size: int | None = Field(None, ge=16, le=4096)
    index: OutputFile | None = None


class EvalConfig(_RunOptions):
    """Options of ``ascension eval``."""

    source: Path
    image_root: Folder | None = None
    gallery: VectorsFile | None = None
    k: str = "1,5,10"
    json_file: OutputFile | None = None
    index: IndexKind = "flat"
    recolor: bool = False
    show: int | None = Field(None, ge=1, le=200)
    output: OutputFile = Path("retrieval.png")

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

    @model_validator(mode="after")
    def _check_sources(self) -> EvalConfig:
        if self.recolor and self.image_root is None:
            raise ValueError("--recolor needs a checkpoint and IMAGE_ROOT (it re-embeds images)")
        if self.image_root is None and self.source.suffix in (".pt", ".pth"):
            raise ValueError(
                "a checkpoint as SOURCE needs IMAGE_ROOT too: ascension eval CHECKPOINT IMAGE_ROOT"
            )
        # A checkpoint with IMAGE_ROOT (embedded first), else a vectors file.
        check = paths.vectors_file if self.image_root is None else paths.checkpoint_file
        _check_path(check, self.source, "source")
        return self


class IndexConfig(_RunOptions):
    """Options of ``ascension index``."""

    checkpoint: CheckpointFile
    gallery_root: Folder
    output: OutputFolder
    add: bool = False

    @model_validator(mode="after")
    def _check_catalog(self) -> IndexConfig:
        if self.add:
            _check_path(paths.catalog_folder, self.output, "output")
        return self


class SearchConfig(_RunOptions):
    """Options of ``ascension search``."""

    catalog: CatalogFolder
    images: list[FileOrFolder] = Field(min_length=1)
    k: int = Field(5, ge=1, le=1000)
    threshold: float | None = Field(None, ge=-1, le=1)
    json_file: OutputFile | None = None


class ExportConfig(BaseModel):
    """Options of ``ascension export``."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: CheckpointFile
    format: Literal["onnx", "torchscript"] = "onnx"
    output: OutputFile
    features: Features = "backbone"
    image_size: int | None = Field(None, ge=16, le=4096)


def _check_path(check: Callable[[Path], Path], path: Path, field: str) -> None:
    """A path check that depends on other options, with its message naming the option."""
    try:
        check(path)
    except ValueError as exc:
        raise ValueError(f"invalid {option_name(field)}: {exc}") from None


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
