"""Atomic file writes: a reader (or a crash) sees the old file or the whole new one, never half."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on some platforms/filesystems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The temp file is private (0600); the finished file gets the mode any program's would.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temp file beside ``path``, fsync it, rename it over ``path``.

    The temp file is removed if anything fails, so an error (a full disk, an interrupt) leaves
    the previous file as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), _FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


# Why a figure is null in a JSON file (strict parsers refuse NaN): by its key, else the default.
NULL_REASONS = {
    "fmr": "no unknown queries to measure it on",
    "fnmr": "no known queries to measure it on",
    "recall_at_1_accepted": "no known query was accepted (or there were none)",
    "auc": "it needs both known and unknown queries",
}
NULL_DEFAULT = "not defined on these queries (none of the kind it is measured over)"


def strict_json(data: Any) -> Any:
    """``data`` as strict JSON holds it: each NaN or infinity becomes null, and the object that
    holds it says why under ``null_reasons``, by key (``{"fnmr": null, "null_reasons": {"fnmr":
    "no known queries ..."}}``), so the reason travels with the figure."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, list | tuple):
        return [strict_json(value) for value in data]
    if not isinstance(data, dict):
        return data
    cleaned = {key: strict_json(value) for key, value in data.items()}
    reasons = {str(key): NULL_REASONS.get(str(key), NULL_DEFAULT) for key, value in data.items()
               if isinstance(value, float) and not math.isfinite(value)}
    if reasons:
        kept = cleaned.get("null_reasons")
        cleaned["null_reasons"] = {**(kept if isinstance(kept, dict) else {}), **reasons}
    return cleaned


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """``data`` as strict JSON (``strict_json``: no NaN), written atomically."""
    return atomic_write_text(path, json.dumps(strict_json(data), indent=2, allow_nan=False)
                             + "\n")
