"""The resume policy: which training options a resumed run may change (fields marked
``RESUMABLE``), and the check of a checkpoint's options against the run's."""

from __future__ import annotations

from typing import Any

from ascension_cli.config.resolve import to_plain
from ascension_cli.config.train import TrainConfig
from ascension_cli.errors import CheckpointError

# Options whose default came to mean something else: a checkpoint written before they existed
# trained as this value (SupCon alone, the LR decaying on a cosine, no weight average).
TRAINED_AS_BEFORE = {"proxy_weight": 0.0, "lr_schedule": "cosine", "ema_decay": 0.0}


def resume_may_change() -> set[str]:
    """Training options a resume may change: those marked RESUMABLE."""
    return {name for name, field in TrainConfig.model_fields.items()
            if (field.json_schema_extra or {}).get("resume_may_change")}



def _resolved(options: dict[str, Any], classes: int) -> dict[str, Any]:
    return {**options, **TrainConfig.model_construct(**options).resolved_from_data(classes)}


def check_resumable(checkpoint: dict[str, Any], config: TrainConfig, classes: list[str]) -> None:
    """Refuse a resume whose options (other than the RESUMABLE ones) or classes differ from the
    checkpoint's."""
    # An option added after the checkpoint was written had its default value then, or the
    # value it trained as before its default changed. A default that depends on the data is
    # compared as each side resolves it on these classes.
    defaults = to_plain(TrainConfig.model_construct())
    saved = _resolved({**defaults, **TRAINED_AS_BEFORE, **checkpoint["config"]}, len(classes))
    current = _resolved(to_plain(config), len(classes))
    may_change = resume_may_change()
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
