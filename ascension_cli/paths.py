"""What each kind of path option must be, checked before any work, in one place.

Every command's config model (``config/``) runs these on its path options, so a folder given
where a file is expected, a file missing, or a file another tool wrote ends the command with
one line (exit 2) before a model is built or an image is read. The checks read headers and
small metadata only; the loaders (``model/checkpoint.py``, ``embedding/vectors.load_vectors``,
``catalog/store.load_catalog``) still check everything they read, for library callers. A
catalogue folder's check lives with its layout (``catalog_layout.py::catalog_folder``).

Each check returns the path unchanged or raises ``ValueError`` with a message that names the path.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path

from ascension_cli.formats import VECTORS_FORMAT, VECTORS_READABLE

_ZIP_MAGIC = b"PK\x03\x04"


def checked(check: Callable[[Path], Path], path: Path, error: type[Exception]) -> Path:
    """``check(path)``, with its ValueError raised as ``error``: a loader's own error type."""
    try:
        return check(path)
    except ValueError as exc:
        raise error(str(exc)) from None


def size_text(path: Path) -> str:
    """A file's size for messages: '12 bytes', '3.4 MB'."""
    try:
        size = path.stat().st_size
    except OSError:
        return "unreadable"
    if size < 10_000:
        return f"{size} bytes"
    return f"{size / 1e6:.1f} MB" if size < 10**9 else f"{size / 1e9:.1f} GB"


def kind_of(path: Path) -> str | None:
    """What ``path`` is when it is not a plain file or folder: None, or a phrase for messages."""
    try:
        mode = path.stat().st_mode  # follows links
    except FileNotFoundError:
        return "a broken link" if path.is_symlink() else "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    return "not a regular file"


def _present(path: Path, missing: str) -> None:
    """Raise unless ``path`` is a plain file or folder (a pipe or device is never opened)."""
    problem = kind_of(path)
    if problem == "missing":
        raise ValueError(f"{missing}: {path}")
    if problem is not None:
        raise ValueError(f"{path} is {problem}")


def existing_folder(path: Path) -> Path:
    _present(path, "folder not found")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder")
    return path


def existing_file(path: Path) -> Path:
    _present(path, "file not found")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    return path


MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


def image_source(path: Path) -> Path:
    """A folder of images, or a manifest file (.csv, .parquet) listing them."""
    manifest = path.suffix.lower() in MANIFEST_SUFFIXES
    _present(path, "manifest not found" if manifest else "folder not found")
    if path.is_dir():
        return path
    if not manifest:
        raise ValueError(f"{path} is a file, not a folder or a manifest (.csv, .parquet)")
    return path


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:")


def is_url(source: object) -> bool:
    """A URL (``scheme://...``, or webdataset's ``pipe:command``), not a local path."""
    return isinstance(source, str) and bool(_URL.match(source))


def images_or_shards(value: object) -> Path | str:
    """An image source (see ``image_source``), or WebDataset shards: a URL or a local pattern
    naming .tar files (``shards/shard-{000000..000127}.tar``). A URL stays a string (a Path
    would fold its ``//``)."""
    text = str(value)
    if is_url(text):
        if ".tar" not in text:
            raise ValueError(f"{text}: a URL must name .tar shards")
        return text
    path = Path(text)
    if ".tar" in path.name and not path.is_dir():
        if "{" not in text:
            _present(path, "shard not found")
        return path
    return image_source(path)


def existing_file_or_folder(path: Path) -> Path:
    _present(path, "not found")
    return path


def _no_file_above(path: Path) -> None:
    for folder in path.parents:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file, not a folder")


def output_file(path: Path) -> Path:
    """A file to write: absent, or a regular file to replace; never a folder."""
    _no_file_above(path)
    problem = kind_of(path)
    if problem not in (None, "missing", "a broken link"):
        raise ValueError(f"{path} is {problem}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name to write")
    return path


def output_folder(path: Path) -> Path:
    """A folder to write into: absent (it is created) or a folder."""
    _no_file_above(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder")
    return path


def not_ours(path: Path, what: str, why: str) -> ValueError:
    """The one message for a file that is not ours or is damaged: its name, size and why."""
    return ValueError(f"{path} ({size_text(path)}) is not {what}, or is damaged: {why}")


def why_unloadable(exc: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in our words: torch's own text
    suggests turning the safety off, which is never the advice."""
    if "unsupported global" in str(exc).lower():  # a class or function torch would not load
        return ("it holds objects other than tensors and plain values, refused unread (loading "
                "them could run code)")
    return "PyTorch cannot read it (damaged, cut short, or not PyTorch's)"


def checkpoint_file(path: Path) -> Path:
    """A file that starts like a checkpoint ``ascension train`` writes (a PyTorch zip archive)."""
    existing_file(path)
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != _ZIP_MAGIC:
        raise not_ours(path, "an Ascension checkpoint",
                       "it is not a PyTorch archive (empty, cut short, or another kind of file)")
    return path


def vectors_file(path: Path) -> Path:
    """A vectors file from ``ascension embed``, of the version this Ascension reads."""
    existing_file(path)
    import numpy as np

    what = "an Ascension vectors file (from `ascension embed`)"
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            stamp = str(archive["format"]) if "format" in names else None
            version = int(archive["version"]) if "version" in names else None
    except Exception:  # numpy raises many kinds for a file it cannot read
        raise not_ours(path, what, "not a readable .npz archive") from None
    if stamp != VECTORS_FORMAT:
        raise not_ours(path, what, "another tool wrote it")
    if version not in VECTORS_READABLE:
        raise ValueError(f"{path} is a version-{version} vectors file; this Ascension reads "
                         f"versions {', '.join(map(str, VECTORS_READABLE))}: embed the images "
                         "again")
    return path


