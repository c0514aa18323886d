"""Development photo sets built from public repositories into ``benchmarks/cache/``.

One place for what every ``get_*.py`` script shares: where the sets go, cloning a repository
(its URL, a clone or a bare mirror), building the class-per-folder tree in a temporary folder
beside the destination and renaming it into place (an interrupted build leaves nothing half
made), and the one-line summary. ``suite()`` lists the sets a benchmark runs by default.
"""

from __future__ import annotations

import argparse
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from _common import ROOT, SHARED_DATA

CACHE = ROOT / "benchmarks" / "cache"
MAX_PHOTO_BYTES = 64 << 20  # a photo of these sets is well under 1 MiB


def suite(cached: bool = True) -> list[Path]:
    """Every set under ../shared/data, then (``cached``) every set a get_*.py script built into
    the cache."""
    found = []
    for parent in (SHARED_DATA, CACHE) if cached else (SHARED_DATA,):
        if parent.is_dir():
            found += sorted(p for p in parent.iterdir() if p.is_dir() and not
                            p.name.startswith("."))
    return found


def clone(source: str, checkout: Path, only: tuple[str, ...] = ()) -> None:
    """A shallow clone of ``source``, its files checked out (with ``only``: just those paths,
    so a repository's notebooks and models are never written); one line and exit 1 when git
    cannot."""
    commands = ([["clone", "--quiet", "--depth", "1", source, str(checkout)]] if not only else
                [["clone", "--quiet", "--depth", "1", "--no-checkout", source, str(checkout)],
                 ["-C", str(checkout), "checkout", "--quiet", "HEAD", "--", *only]])
    for command in commands:
        ran = subprocess.run(["git", *command], capture_output=True, text=True)
        if ran.returncode != 0:
            last = (ran.stderr.strip().splitlines() or ["git failed"])[-1]
            raise SystemExit(f"error: cannot clone {source}: {last}")


def photo_bytes(photo: Path, checkout: Path) -> bytes:
    """One photo of a cloned repository, read: a regular file inside the clone (not a link, a
    device or a path out of it, which a hostile repository or list could name), of bounded
    size; one line and exit 1 otherwise."""
    inside = photo.resolve().is_relative_to(checkout.resolve())
    found = photo.lstat() if inside and photo.exists() else None
    if found is None or not stat.S_ISREG(found.st_mode) or found.st_size > MAX_PHOTO_BYTES:
        raise SystemExit(f"error: {photo.relative_to(checkout)} is not a photo file of the "
                         f"repository (a link, a missing or special file, or over "
                         f"{MAX_PHOTO_BYTES >> 20} MiB)")
    return photo.read_bytes()


def copy_photo(photo: Path, checkout: Path, target: Path) -> None:
    """Copy one photo of a cloned repository, checked as ``photo_bytes`` checks it."""
    target.write_bytes(photo_bytes(photo, checkout))


def build_set(doc: str, url: str, name: str,
              build: Callable[[Path, Path], dict[str, int]], only: tuple[str, ...] = ()) -> None:
    """The command line of a get_*.py script: clone (``only`` those paths, when given),
    ``build(checkout, tree)`` (photos a class), rename the tree into
    ``benchmarks/cache/<name>`` (or ``--output``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--source", default=url,
                        help="the repository to clone: its URL, a clone or a bare mirror")
    parser.add_argument("--output", type=Path, default=CACHE / name)
    args = parser.parse_args()
    if args.output.exists():
        print(f"{args.output} exists already: remove it to build it again")
        return
    try:
        counts = _build_in_place(args, name, build, only)
    except OSError as error:  # an unwritable --output, a full disk: one line, nothing left
        where = f" ({error.filename})" if error.filename else ""
        raise SystemExit(f"error: cannot build {args.output}: "
                         f"{error.strerror or error}{where}") from None
    print(f"{args.output}: {sum(counts.values())} photos in {len(counts)} classes "
          f"({min(counts.values())}-{max(counts.values())} a class)")


def _build_in_place(args, name: str, build: Callable[[Path, Path], dict[str, int]],
                    only: tuple[str, ...]) -> dict[str, int]:
    """Clone and build in a temporary folder beside ``--output``, then rename it there."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.output.parent, prefix=f".{name}-") as work:
        checkout = Path(work) / "checkout"
        clone(str(args.source), checkout, only)
        built = Path(work) / name
        counts = build(checkout, built)
        if not counts:
            raise SystemExit(f"error: no photos found in {args.source}")
        built.rename(args.output)
    return counts
