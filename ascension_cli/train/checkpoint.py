"""Atomic checkpoint writes and safe loads (no pickled code is ever executed)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ascension_cli.atomic import atomic_write
from ascension_cli.errors import CheckpointError, first_line

FORMAT = "ascension-checkpoint"
FORMAT_VERSION = 1


def atomic_save(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` so that ``path`` is always either the old file or the complete new one."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an Ascension checkpoint with ``weights_only=True`` and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an Ascension checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this Ascension reads "
            f"version {FORMAT_VERSION}"
        )
    return payload
