"""The resume policy: which training options a resumed run may change (fields marked
``RESUMABLE``), and the check of a checkpoint's options against the run's."""

from __future__ import annotations

from typing import Any

from ascension_cli.config.fields import PLANNED_OPTIONS
from ascension_cli.config.resolve import to_plain
from ascension_cli.config.train import TrainConfig
from ascension_cli.errors import CheckpointError


def resume_may_change() -> set[str]:
    """Training options a resume may change: those marked RESUMABLE."""
    return {name for name, field in TrainConfig.model_fields.items()
            if (field.json_schema_extra or {}).get("resume_may_change")}


def check_resumable(checkpoint: dict[str, Any], config: TrainConfig, classes: list[str]) -> None:
    """Refuse a resume whose options (other than the RESUMABLE ones) or classes differ from the
    checkpoint's. The planned options (``PLANNED_OPTIONS``) are compared as the plans of the two
    runs resolve them (``train/plan.py::check_plan``), not here."""
    # An option added after the checkpoint was written had its default value then.
    saved = {**to_plain(TrainConfig.model_construct()), **checkpoint["config"]}
    current = to_plain(config)
    may_change = resume_may_change() | PLANNED_OPTIONS
    differences = [
        f"{key}: {saved.get(key)!r} -> {current[key]!r}"
        for key in sorted(current)
        if key not in may_change and saved.get(key) != current[key]
    ]
    if differences:
        raise CheckpointError(
            "cannot resume: options differ from the checkpoint's (" + "; ".join(differences)
            + "); resume with the original options or start a new --save-dir"
        )
    if checkpoint["classes"] != classes:
        raise CheckpointError(
            "cannot resume: the dataset's classes differ from those the checkpoint was trained on"
        )
