"""A catalogue's history: one JSON line per change in ``history.jsonl``, never rewritten.

Each change's entry (what, how many photos and items, when, by whom) is written into
catalog.json with the generation it makes (``store.write_catalog``), so the commit and its
record are one atomic write; the line is appended after. A writer killed between the two leaves
the line missing, and the next writer (``record_pending``) appends it from catalog.json. A line
torn by a crash is skipped on reading, and the next line starts on a line of its own.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path

from ascension_cli.atomic import strict_json
from ascension_cli.catalog_layout import CATALOG_JSON, HISTORY_FILE

ACTIONS = ("build", "add", "remove", "relabel", "replace", "calibrate", "upgrade", "rollback")
MAX_LINE_CHARS = 4096  # a line longer than this is not ours


def local_user() -> str:
    """Who changes the catalogue from this machine's command line."""
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def change(action: str, by: str, photos: int, items: int, **details) -> dict:
    """A history entry: ``action`` (one of ``ACTIONS``) by ``by`` (``local_user()`` or
    ``token:NAME``), touching ``photos`` photos of ``items`` items, now."""
    assert action in ACTIONS, action
    return {"action": action, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "by": by[:200], "photos": int(photos), "items": int(items), **details}


def record(directory: Path, entry: dict) -> None:
    """Append a change that writes no generation (a calibration), after it is made."""
    _append(directory, entry)


def _append(directory: Path, entry: dict) -> None:
    path = directory / HISTORY_FILE
    line = json.dumps(strict_json(entry), ensure_ascii=False, allow_nan=False)
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell():  # a torn last line (a crash mid-append) keeps the new one apart
            handle.seek(-1, os.SEEK_END)
            starts_clean = handle.read(1) == b"\n"
        else:
            starts_clean = True
        handle.write((b"" if starts_clean else b"\n") + line.encode("utf-8") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_history(directory: Path) -> list[dict]:
    """Every change recorded, oldest first (a damaged line is skipped)."""
    path = directory / HISTORY_FILE
    if not path.is_file():
        return []
    entries = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if len(line) > MAX_LINE_CHARS:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("action") in ACTIONS:
                entries.append(entry)
    return entries


TAIL_BYTES = 4 * MAX_LINE_CHARS  # read to find the last change recorded


def _last_recorded(directory: Path) -> int:
    """The generation the last recorded change made (0: none), read off the file's tail."""
    path = directory / HISTORY_FILE
    if not path.is_file():
        return 0
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - TAIL_BYTES))
        lines = handle.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            generation = json.loads(line).get("to_generation")
        except (ValueError, AttributeError):
            continue
        if isinstance(generation, int):
            return generation
    return 0


def record_pending(directory: Path) -> None:
    """Append the change catalog.json names if the history lacks it (the writer that made it
    was stopped before appending). The caller holds the catalogue's lock."""
    try:
        meta = json.loads((directory / CATALOG_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    entry = meta.get("change") if isinstance(meta, dict) else None
    if (isinstance(entry, dict) and isinstance(entry.get("to_generation"), int)
            and entry["to_generation"] > _last_recorded(directory)):
        _append(directory, entry)


def summary(entries: list[dict], last: int = 5) -> dict:
    """What ``/info`` shows of a history: how many changes, and the last few."""
    return {"changes": len(entries), "last": entries[-last:][::-1]}
