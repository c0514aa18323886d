"""The shared vocabulary of the option models: choices, path types, help texts, how a field
is spelled on the command line. Imports nothing of the models, so every one of them can use it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from ascension_cli import paths
from ascension_cli.catalog_layout import (
    PHOTO_MODES,
    catalog_folder,
    catalog_location,
    folder_only,
    output_location,
)

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Accumulation = Literal["cache", "naive"]
Augment = Literal["color-agnostic", "color-preserving", "auto", "standard", "none"]
Head = Literal["none", "mlp", "linear"]
LrScaling = Literal["linear", "sqrt", "none"]
LrSchedule = Literal["constant", "cosine"]
Tracker = Literal["tensorboard", "mlflow", "none"]
PhotoMode = Literal[PHOTO_MODES]  # the choices live in catalog_layout.py
ConfigT = TypeVar("ConfigT", bound=BaseModel)

# Path options, each checked by paths.py before any work (one line, exit 2 when wrong).
Folder = Annotated[Path, AfterValidator(paths.existing_folder)]
ImageSource = Annotated[Path, AfterValidator(paths.image_source)]
StreamSource = Annotated[Path | str, BeforeValidator(paths.images_or_shards)]
FileOrFolder = Annotated[Path, AfterValidator(paths.existing_file_or_folder)]
OutputFile = Annotated[Path, AfterValidator(paths.output_file)]
OutputFolder = Annotated[Path, AfterValidator(paths.output_folder)]
WeightsFile = Annotated[Path, AfterValidator(paths.existing_file)]
ExistingFile = Annotated[Path, AfterValidator(paths.existing_file)]
CheckpointFile = Annotated[Path, AfterValidator(paths.checkpoint_file)]
VectorsFile = Annotated[Path, AfterValidator(paths.vectors_file)]
CatalogFolder = Annotated[Path, BeforeValidator(folder_only), AfterValidator(catalog_folder)]
# A folder, or milvus://HOST:PORT/COLLECTION (``catalog/milvus_store.py``).
CatalogLocation = Annotated[Path | str, BeforeValidator(catalog_location)]
CatalogOutput = Annotated[Path | str, BeforeValidator(output_location)]
# Fields given as positional arguments: messages spell them as the help does (DATA_ROOT).
POSITIONAL = {"data_root", "checkpoint", "image_root", "source", "gallery_root", "catalog",
              "images", "photo", "new_photo", "destination"}

# --lr is the learning rate of a step over this many images (a plain loop's batch size).
LR_REFERENCE_BATCH = 32
# Warmup when --warmup-epochs is not given: this share of all optimizer steps.
WARMUP_SHARE = 0.05
# --lr-schedule cosine decays the LR to this share of its peak by the last step.
COSINE_FLOOR = 0.01
# --proxy-weight, --lr-schedule and --ema-decay when not given: on data with more classes than
# a target batch holds (the many-class case), and elsewhere.
AUTO_PROXY_WEIGHT = 0.3
# SupCon's temperature, on every set (0.07 in the many-class case until round fifteen).
TEMPERATURE = 0.1
# Below this, similarities over the temperature overflow float32 (1e-45 gives every step a
# non-finite loss); published SupCon runs use 0.05 to 0.5.
MIN_TEMPERATURE = 0.001
LR_SCHEDULE, MANY_CLASS_LR = "cosine", "constant"
MANY_CLASS_EMA = 0.9
# The options whose default depends on the data: (the value in that many-class case, the
# value elsewhere).
DATA_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "proxy_weight": (AUTO_PROXY_WEIGHT, 0.0),
    "lr_schedule": (MANY_CLASS_LR, LR_SCHEDULE),
    "ema_decay": (MANY_CLASS_EMA, 0.0),
}
# Options a resume compares as the two runs' plans hold them (``train/plan.py::check_plan``),
# not as given: those above, --temperature, which a checkpoint written while its default
# followed the data records as None, and --frozen-stages, whose default follows the model.
PLANNED_OPTIONS = frozenset(DATA_DEFAULTS) | {"temperature", "frozen_stages"}
# --frozen-stages when not given, on a backbone that starts from weights and whose stages timm
# groups as an EfficientNet's (AUTO_FROZEN_OF after its stem, where it was measured): the stem
# and the first AUTO_FROZEN_STAGES stages keep their starting weights; elsewhere none.
AUTO_FROZEN_STAGES, AUTO_FROZEN_OF = 2, 7

# Options a resume may change (where and how fast it runs, not what it learns; channels_last and
# compile change only the order of floating-point operations) carry this mark.
RESUMABLE = {"resume_may_change": True}
SHORT_O = {"flags": ["--output", "-o"]}
WORKERS_HELP = ("Data-loading processes. (default: one per core up to 8 on a GPU; on the CPU one "
                "per 8 cores, as the model's threads use them all)")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps."
CHANNELS_LAST_HELP = ("Run the model on NHWC weights and images: faster convolutions (up to 1.8x "
                      "measured on the CPU), same results up to rounding.")

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
Features = Literal["backbone", "head"]
Split = Literal["train", "validation", "test"]


def split_field() -> Any:
    return Field(None, description="With a manifest: only its rows of this split.")
IndexKind = Literal["flat", "hnsw", "ivf", "ivfpq"]
CatalogIndexKind = Literal["flat", "hnsw", "ivf", "ivfpq", "diskann"]  # diskann: Milvus only
ProxyStart = Literal["means", "random"]
GroupBy = Literal["photo", "item"]


def features_field() -> Any:
    return Field("backbone", description="backbone: the pooled trunk features, which training "
                 "shapes and retrieval uses. head: the projection head's output.")


# The open-set options eval, report and calibrate share: one definition of each, with its range;
# the help says what each command does with it.
def unknown_classes_field(description: str) -> Any:
    return Field(None, gt=0, lt=1, description=description)


def target_fmr_field(description: str) -> Any:
    return Field(0.01, gt=0, lt=1, description=description)


def held_out_seed_field() -> Any:
    return Field(0, ge=0, le=2**32 - 1, description="Which classes --unknown-classes holds out.")


def image_size_field() -> Any:
    return Field(None, ge=16, le=4096, description="Input size. (default: the checkpoint's)")



def check_device(value: str) -> str:
    """A --device value: auto, cpu, cuda, cuda:N or mps."""
    if not DEVICE_PATTERN.match(value):
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
    return value


def option_name(field: str) -> str:
    """The command-line spelling of a config field: DATA_ROOT for an argument, else --option."""
    return field.upper() if field in POSITIONAL else "--" + field.replace("_", "-")



def check_path(check: Callable[[Path], Path], path: Path, field: str) -> None:
    """A path check that depends on other options, with its message naming the option."""
    try:
        check(path)
    except ValueError as exc:
        raise ValueError(f"invalid {option_name(field)}: {exc}") from None


# ---- facts of the options that the layers above apply: the size syntax of --shard-size, the
# sampler's rule for how many classes a target batch holds (which decides the many-class
# defaults), and which --loss names are pytorch-metric-learning losses.
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``1GB``, ``500MB``, ``64MiB`` or ``1e6``."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write it like 1GB, 500MB or 64MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def classes_per_batch(classes: int, target_batch: int, samples_per_class: int) -> int:
    """How many of ``classes`` a target batch holds: ``target_batch // samples_per_class``, at
    least one and at most all of them."""
    return min(classes, max(1, target_batch // samples_per_class))


PML_PREFIX = "pml:"
PML_MISSING = ("pytorch-metric-learning is not installed: pip install 'ascension-cli[pml]' "
               "(or pip install pytorch-metric-learning)")


def pml_loss_class(name: str) -> type:
    """The class ``name`` in ``pytorch_metric_learning.losses``: a loss of embeddings and
    labels. ``ValueError`` (one line) for anything else, ``ImportError`` without the library."""
    try:
        from pytorch_metric_learning import losses
    except ImportError:
        raise ImportError(PML_MISSING) from None
    found = getattr(losses, name, None)
    base = losses.BaseMetricLossFunction
    if not (isinstance(found, type) and issubclass(found, base) and found is not base):
        known = sorted(n for n, c in vars(losses).items()
                       if isinstance(c, type) and issubclass(c, base) and c is not base)
        raise ValueError(f"no pytorch-metric-learning loss {name!r}; it has "
                         + ", ".join(known[:12]) + (", ..." if len(known) > 12 else ""))
    return found
