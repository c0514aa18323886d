"""The photos a catalogue owns: each kept once under ``photos/``, named by the sha256 of its
bytes, so the catalogue can be moved, backed up and embedded again on its own. For very large
sets a catalogue may instead refer to each photo where it is, with its digest, which is checked
before the photo is embedded again (``verified``).

A change that writes or drops photos first says so in ``.change.json`` (the names it drops,
and whether it writes any); once the change is committed (or has failed, or was killed),
``settle`` removes every photo the live generation does not hold (after a change that wrote
photos, by a walk of ``photos/``: its new names are known only as each photo is read), then the
journal. So the photos on disk are the ones the catalogue holds, whatever instant a change
stopped at.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

from ascension_cli.atomic import atomic_write, atomic_write_json
from ascension_cli.catalog_layout import (
    CHANGE_JOURNAL,
    PHOTO_MODES,
    PHOTOS_FOLDER,
    STORED_NAME,
    UPLOAD_NAME,
    UPLOADS_FOLDER,
)
from ascension_cli.errors import DataError

_SUFFIX = re.compile(r"\.[a-z0-9]{2,5}")
CHUNK = 1 << 20


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes, read a chunk at a time."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def stored_name(digest: str, suffix: str) -> str:
    """Where the catalogue keeps a photo of this digest: photos/AB/DIGEST.EXT (the file's own
    suffix, lower-cased, where it is a plain one)."""
    suffix = suffix.lower() if _SUFFIX.fullmatch(suffix.lower()) else ".img"
    name = f"{PHOTOS_FOLDER}/{digest[:2]}/{digest}{suffix}"
    assert STORED_NAME.fullmatch(name), name
    return name


def keep_bytes(directory: Path, data: bytes, suffix: str) -> tuple[str, str]:
    """Keep ``data`` as one of the catalogue's photos (once, whatever the number of rows that
    show it); (its stored name, its digest)."""
    digest = digest_of(data)
    name = stored_name(digest, suffix)
    target = directory / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda handle: handle.write(data))
    return name, digest


def keep_files(directory: Path, paths: Iterable[Path], mode: str) -> tuple[list[str], list[str]]:
    """(stored names, digests) of photos being added: copied in (``copy``) or, for
    ``reference``, left where they are ("" for a stored name), with their digests."""
    if mode not in PHOTO_MODES:
        raise DataError(f"{{photos}} must be one of {', '.join(PHOTO_MODES)}, not {mode!r}",
                        options=("photos",))
    names, digests = [], []
    for path in paths:
        if mode == "reference":
            names.append("")
            digests.append(file_digest(path))
            continue
        name, digest = keep_bytes(directory, Path(path).read_bytes(), Path(path).suffix)
        names.append(name)
        digests.append(digest)
    return names, digests


def verified(path: Path, digest: str | None) -> bool:
    """Whether the photo at ``path`` is still the one the catalogue recorded (no digest: an
    older catalogue's, which cannot be checked, counts as verified when it is there)."""
    if not path.is_file():
        return False
    return not digest or file_digest(path) == digest


def begin(directory: Path, writes: bool, dropped: list[str] = ()) -> None:
    """Say, before touching any photo, that a change writes photos and which it drops."""
    atomic_write_json(directory / CHANGE_JOURNAL,
                      {"writes": bool(writes), "dropped": sorted(set(dropped) - {""})})


def pending(directory: Path) -> dict | None:
    """The journal of an unsettled change, or None when none is in progress."""
    path = directory / CHANGE_JOURNAL
    if not path.exists():
        return None
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        dropped = [name for name in journal["dropped"]
                   if isinstance(name, str) and STORED_NAME.fullmatch(name)]
        return {"writes": journal["writes"] is True, "dropped": dropped}
    except (OSError, ValueError, KeyError, TypeError):
        # Written atomically, so only a hand can have damaged it: settle by a full walk.
        return {"writes": True, "dropped": []}


def _written(directory: Path) -> list[str]:
    """Every photo file under photos/, and any a writer left half-written there."""
    folder = directory / PHOTOS_FOLDER
    if not folder.is_dir():
        return []
    return [path.relative_to(directory).as_posix() for path in folder.glob("*/*")
            if path.is_file() and not path.is_symlink()]


def settle(directory: Path, held: set[str], journal: dict) -> int:
    """Remove the photos a change (its ``journal``) left that the live generation does not
    hold (``held``), then the journal; how many went."""
    names = [*journal["dropped"], *(_written(directory) if journal["writes"] else [])]
    removed = 0
    for name in names:
        path = directory / name
        half_written = Path(name).name.startswith(".") and name.endswith(".tmp")
        ours = STORED_NAME.fullmatch(name) or half_written
        if ours and name not in held and path.is_file() and not path.is_symlink():
            path.unlink()
            removed += 1
    (directory / CHANGE_JOURNAL).unlink(missing_ok=True)
    return removed


def remove_orphan_uploads(directory: Path, paths: list[str]) -> int:
    """Remove photos under uploads/ (where ``serve`` kept added photos before the catalogue
    owned them) that the catalogue does not hold, its ``paths``: an add interrupted between
    writing them and committing; how many. Only files named as ``serve`` named an added photo
    are touched, matched by name, so a moved catalogue keeps its photos."""
    uploads = directory / UPLOADS_FOLDER
    if not uploads.is_dir():
        return 0
    held = {Path(path).name for path in paths}
    removed = 0
    for path in uploads.rglob("*"):
        orphan = UPLOAD_NAME.fullmatch(path.name) and path.name not in held
        half_written = path.name.startswith(".") and path.name.endswith(".tmp")
        if (orphan or half_written) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
