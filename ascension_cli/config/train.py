"""The options of ``ascension train``: every field with its range, default and help, and the
checks across fields (target batch a multiple of the micro-batch, ...)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ascension_cli import paths
from ascension_cli.config.fields import (
    AUTO_FROZEN_OF,
    AUTO_FROZEN_STAGES,
    AUTO_PROXY_WEIGHT,
    CHANNELS_LAST_HELP,
    COSINE_FLOOR,
    DEVICE_HELP,
    LR_REFERENCE_BATCH,
    LR_SCHEDULE,
    MANY_CLASS_EMA,
    MANY_CLASS_LR,
    MIN_TEMPERATURE,
    PML_PREFIX,
    RESUMABLE,
    TEMPERATURE,
    WARMUP_SHARE,
    WORKERS_HELP,
    Accumulation,
    Augment,
    Head,
    ImageSource,
    LrScaling,
    LrSchedule,
    OutputFolder,
    Precision,
    ProxyStart,
    StreamSource,
    Tracker,
    WeightsFile,
    check_device,
    option_name,
    pml_loss_class,
)
from ascension_cli.formats import DEFAULT_MAX_PIXELS


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
        None, ge=0, description="Linear LR warmup in epochs, then --lr-schedule. (default: "
        f"{WARMUP_SHARE:.0%} of the run's optimizer steps)"
    )
    lr_schedule: LrSchedule | None = Field(
        None, description="The LR after the warmup: constant, the peak to the end; or cosine, "
        f"decaying to {COSINE_FLOOR:.0%} of it by the last step. (default: {MANY_CLASS_LR} when "
        f"a target batch cannot hold every class, else {LR_SCHEDULE})")
    ema_decay: float | None = Field(
        None, ge=0, lt=1, description="Validate and save an exponential moving average of the "
        "weights, keeping this share of it at each step (0: the weights as trained). (default: "
        f"{MANY_CLASS_EMA} when a target batch cannot hold every class, else 0)")
    lr: float = Field(
        6e-4, gt=0, le=10,
        description=f"Peak learning rate for {LR_REFERENCE_BATCH} images per step; --lr-scaling "
        f"turns it into the step's LR (linear: x --target-batch/{LR_REFERENCE_BATCH}).",
    )
    lr_scaling: LrScaling = Field("linear", description="How --lr follows --target-batch.")
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=1,
        description="The backbone's LR as a share of the head's, with --head mlp or linear.",
    )
    frozen_stages: int | None = Field(
        None, ge=0, le=64,
        description="Keep the backbone's stem and its first N stages (an EfficientNet's block "
        "stages, a ResNet's layers, a ViT's blocks) at the starting weights, BatchNorm "
        "statistics too: no backward pass through them, so a step costs less. 0 trains every "
        f"layer. (default: {AUTO_FROZEN_STAGES} on a backbone with starting weights and "
        f"{AUTO_FROZEN_OF} stages after its stem, an EfficientNet's; else 0)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    temperature: float = Field(TEMPERATURE, ge=MIN_TEMPERATURE, le=10,
                               description="SupCon temperature.")
    loss: str = Field(
        "supcon", description="supcon: SupCon at --temperature. pml:NAME: any "
        "pytorch-metric-learning loss (pml:ProxyAnchorLoss, pml:MultiSimilarityLoss, ...) over "
        "the whole --target-batch through the same cached step, its own parameters (proxies) "
        "at --loss-lr-scale x the LR; needs pip install 'ascension-cli[pml]'.")
    instance_weight: float = Field(
        0.0, ge=0, le=1, description="Give this share of SupCon to telling each photo from "
        "every other, its own other views its only positives (SimCLR's term), so lookalike "
        "photos of a class stay apart and a query's first five hold more near matches; needs "
        "--views 2 or more. 0: classes alone. (0.1 at 2 views: TrashNet's validation "
        "Recall@5 +2.0 points; on the clothing photos Recall@5 level and MAP@R -1.7: "
        "docs/benchmarks.md round twenty-one)")
    loss_option: list[str] = Field(
        default_factory=list, description="key=value for a pml: loss, read as YAML; repeat it "
        "(--loss-option margin=0.1 --loss-option alpha=32). num_classes and embedding_size are "
        "filled in.")
    loss_lr_scale: float = Field(
        100.0, gt=0, le=100000, description="The LR of the loss's own parameters (a pml: "
        "loss's or --proxy-weight's proxies) as a multiple of the step's LR.")
    proxy_weight: float | None = Field(
        None, ge=0, le=100, description="Add this much of a Proxy-Anchor term (one learned "
        "proxy per class, margin 0.1, alpha 32) to SupCon, over the same batch; 0: SupCon "
        f"alone. (default: {AUTO_PROXY_WEIGHT} when a target batch cannot hold every class, "
        "the proxies standing for the classes it leaves out; else 0)")
    proxy_start: ProxyStart = Field(
        "random", description="Where --proxy-weight's proxies start: random, the Proxy-Anchor "
        "paper's Kaiming start; means, each at its class's mean feature under the starting "
        "weights (a few training photos a class, embedded once).",
        json_schema_extra=RESUMABLE)  # placed before the first step: a resume keeps its proxies
    model: str = Field("tf_efficientnetv2_m", min_length=1, description="Any timm model name.")
    image_size: int | None = Field(
        None, ge=16, le=4096,
        description="Square input size. (default: the model's pretrained input size)",
    )
    embedding_dim: int = Field(128, ge=2, le=65536, description="Projection head output size, "
                               "with --head mlp or linear.")
    head: Head = Field(
        "none", description="What the loss trains: none (the pooled backbone features, which "
        "retrieval uses), or an mlp or linear projection head on them."
    )
    flip_average: bool = Field(
        False, description="Embed each photo as the mean of its vector and its mirror image's "
        "in every search after training (recorded in the checkpoint: embed, eval, catalogues, "
        "the service, export); validation embeds without it, so best.pt is chosen as without "
        "it. A second forward pass at every search. Off where left and right tell items apart.")
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
    views: int = Field(1, ge=1, le=16, description="Augmented views per image in a step; "
                       "with 1, an image's positives are the other images of its class.")
    samples_per_class: int = Field(4, ge=1, description="Images per class in each target batch.")
    augment: Augment = Field(
        "auto", description="color-agnostic: colour destroyed or randomised, so the "
        "same item in another colour lands close. color-preserving: lighting changes only, for "
        "catalogues where colour tells items apart (a red and a green apple). auto: "
        "color-preserving when, all in grayscale, the validation photos searched among the "
        "training photos lose more than 3 points of the starting model's Recall@1, else "
        "color-agnostic. standard: SimCLR. "
        "none.")
    val_fraction: float = Field(0.1, ge=0, lt=1,
                                description="Share of each class held out for validation.")
    val_root: ImageSource | None = Field(
        None, description="A separate validation tree, or a manifest (its validation rows when "
        "it has a split column), with the training classes."
    )
    gallery_check: int = Field(
        2000, ge=0, description="At the start and the end, search the validation photos among "
        "up to this many training photos (spread over the classes), as a catalogue of them "
        "would, with the starting weights and with best.pt, and say whether training helped "
        "that search. Each epoch's validation searches the validation photos among themselves, "
        "which can promise more than a catalogue sees. 0 skips it (shards always do).")
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
    sync_bn: bool = Field(False, description="Under DDP, BatchNorm statistics over all "
                          "processes.")
    freeze_bn: bool = Field(False, description=(
        "Keep BatchNorm statistics as the starting weights have them (their weights still "
        "train), as published metric-learning protocols do; it lowered Recall@1 and MAP@R on "
        "every set measured (docs/benchmarks.md, round ten)."))
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1,
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

    _check_device = field_validator("device")(check_device)

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
        if self.frozen_stages and not self.pretrained and self.weights is None:
            raise ValueError("--frozen-stages keeps starting weights, and a run from scratch "
                             "has none: give --weights FILE, or drop --no-pretrained")
        if self.val_root is not None and "val_fraction" in self.model_fields_set:
            raise ValueError("give either --val-root or --val-fraction, not both")
        _check_loss(self)
        return self

    @property
    def loss_options(self) -> dict[str, Any]:
        """--loss-option key=value pairs, the values read as YAML (numbers, true, text)."""
        return dict(loss_option(item) for item in self.loss_option)


def _check_loss(config: TrainConfig) -> None:
    """--loss names SupCon or a pytorch-metric-learning loss; the options fit it (an instance
    term needs SupCon and two views)."""
    if config.instance_weight and (config.loss != "supcon" or config.views < 2):
        raise ValueError("--instance-weight tells a photo's views from other photos: it "
                         "needs --views 2 or more and --loss supcon")
    if config.loss == "supcon":
        if "loss_option" in config.model_fields_set:
            raise ValueError("--loss-option applies to a pml: loss, not --loss supcon")
        if "loss_lr_scale" in config.model_fields_set and config.proxy_weight == 0:
            raise ValueError("--loss-lr-scale applies to a loss with proxies: a pml: loss, "
                             "or --proxy-weight above 0")
        return
    if config.proxy_weight:
        raise ValueError("--proxy-weight adds proxies to SupCon; a pml: loss brings its own "
                         "(drop --proxy-weight, or give --loss supcon)")
    name = config.loss.removeprefix(PML_PREFIX)
    if not config.loss.startswith(PML_PREFIX) or not name.isidentifier():
        raise ValueError(f"--loss {config.loss!r}: give supcon, or pml:NAME with NAME a "
                         "pytorch-metric-learning loss, like pml:ProxyAnchorLoss")
    if "temperature" in config.model_fields_set:
        raise ValueError("--temperature is SupCon's; give a pml: loss its own with "
                         "--loss-option")
    try:
        pml_loss_class(name)
    except ImportError as exc:
        raise ValueError(f"--loss {config.loss}: {exc}") from None
    config.loss_options  # noqa: B018 (each key=value checked)


def loss_option(item: str) -> tuple[str, Any]:
    """One --loss-option key=value: the key, and the value read as YAML, with no NaN or
    infinity in it."""
    key, equals, value = item.partition("=")
    if not equals or not key.strip().isidentifier():
        raise ValueError(f"--loss-option {item!r}: give key=value, like margin=0.1")
    read = option_value(value.strip())
    if not _finite(read):
        raise ValueError(f"--loss-option {item!r}: give a finite number (NaN and infinity "
                         "make every step useless)")
    return key.strip(), read


def _finite(value: Any) -> bool:
    """Whether a --loss-option value holds no NaN or infinity (in a list or mapping either)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_finite(item) for item in value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    return True


def option_value(text: str) -> Any:
    """A number (1e-3 too, which YAML reads as text), else what YAML reads (true, a list),
    else the text: how ``--loss-option`` and the benchmarks' ``--variant`` read a value."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text
