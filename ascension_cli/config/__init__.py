"""Every command's options, declared once as pydantic models: the single source of names,
defaults, ranges, help texts and validation.

A config file (YAML or TOML) supplies defaults, command-line options override it, and the merged
result is validated once (``resolve``), so a mistyped key or an out-of-range value stops the run
before any work. ``fields`` holds the shared vocabulary; ``train``, ``commands`` and
``catalogue`` the models; ``resolve`` the merge and its one-line errors; ``resume`` which
options a resume may change.
"""

from ascension_cli.config.catalogue import CalibrateConfig, IndexConfig, SearchConfig, ServeConfig
from ascension_cli.config.commands import (
    DemoConfig,
    EmbedConfig,
    EvalConfig,
    ExportConfig,
    ManifestConfig,
    ReportConfig,
    ShardConfig,
)
from ascension_cli.config.fields import (
    AUTO_PROXY_WEIGHT,
    COSINE_FLOOR,
    LR_REFERENCE_BATCH,
    POSITIONAL,
    RESUMABLE,
    TEMPERATURE,
    WARMUP_SHARE,
    option_name,
)
from ascension_cli.config.resolve import read_config_file, resolve, to_plain
from ascension_cli.config.resume import check_resumable, resume_may_change
from ascension_cli.config.train import TrainConfig

__all__ = [
    "AUTO_PROXY_WEIGHT", "COSINE_FLOOR", "LR_REFERENCE_BATCH",
    "POSITIONAL", "RESUMABLE", "TEMPERATURE", "WARMUP_SHARE",
    "CalibrateConfig", "DemoConfig", "EmbedConfig",
    "EvalConfig", "ExportConfig", "IndexConfig", "ManifestConfig", "ReportConfig", "SearchConfig",
    "ServeConfig", "ShardConfig", "TrainConfig", "check_resumable", "option_name",
    "read_config_file", "resolve", "resume_may_change", "to_plain",
]
