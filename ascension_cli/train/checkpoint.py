"""Atomic checkpoint writes and safe loads (no pickled code is ever executed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ascension_cli.atomic import atomic_write
from ascension_cli.errors import CheckpointError
from ascension_cli.paths import CHECKPOINT_FORMAT as FORMAT
from ascension_cli.paths import CHECKPOINT_VERSION as FORMAT_VERSION
from ascension_cli.paths import checkpoint_file, not_ours, why_unloadable

# What every reader needs: the model (spec and weights) and what it was trained on.
REQUIRED_KEYS = ("model", "spec", "config", "classes")


def atomic_save(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` so that ``path`` is always either the old file or the complete new one."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    """The one error for a file that is not an Ascension checkpoint or is damaged."""
    return CheckpointError(str(not_ours(path, "an Ascension checkpoint", why)))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an Ascension checkpoint with ``weights_only=True`` and check its format.

    Whatever torch raises, the error is one line naming the file and its size; it never suggests
    turning ``weights_only`` off.
    """
    path = Path(path)
    try:
        checkpoint_file(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError... whatever torch raises
        raise not_a_checkpoint(path, why_unloadable(exc)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise not_a_checkpoint(path, "another program wrote it (timm weights go to --weights)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this Ascension reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise not_a_checkpoint(path, f"it lacks {', '.join(missing)}")
    return payload
