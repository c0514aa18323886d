"""WebDataset tar shards: writing them from a folder tree or manifest, and reading them as a
stream (local files, or any URL the ``webdataset`` package opens).

A shard is a plain tar of samples, each a few members sharing one key: ``KEY.jpg`` (the image's
bytes as they were, whatever the extension), ``KEY.cls`` (the class index as text) and
``KEY.json`` (label, original path and split). ``dataset.json`` beside the shards names the
classes and each shard's image count, so training knows the epoch length and the classes before
reading a byte of image data.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascension_cli.data.folder import FolderScan
from ascension_cli.errors import DataError
from ascension_cli.formats import SHARD_FORMAT
from ascension_cli.paths import is_url
from ascension_cli.values import whole

SIDECAR = "dataset.json"
# Shards are untrusted input: a member is refused from its tar header past these sizes, so a
# small compressed shard cannot make a reader hold gigabytes.
MAX_IMAGE_BYTES = 64 * 2**20
MAX_SIDECAR_MEMBER_BYTES = 2**20  # a .cls or .json member
MAX_DATASET_JSON_BYTES = 256 * 2**20
# A count dataset.json claims sizes allocations (a label per sample), so it is bounded by what
# the shards can hold: a sample is at least two tar members, a 512-byte header each and a
# 512-byte block for its label; a shard read over a URL (its size unknown up front) by a count
# per shard, and a shard set by a total.
MIN_SAMPLE_BYTES = 1536
MAX_SHARD_SAMPLES = 10**7
MAX_SAMPLES = 10**9
def is_shards(source: str | Path) -> bool:
    """A shard pattern or URL (``.tar`` in it), or a local folder holding ``dataset.json``."""
    text = str(source)
    if ".tar" in text and not os.path.isdir(text):
        return True
    return os.path.isfile(os.path.join(text, SIDECAR))


def expand_braces(pattern: str) -> list[str]:
    """``a{000..002}.tar`` -> a000.tar, a001.tar, a002.tar (zero padding kept); also ``{x,y}``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


# ---------------------------------------------------------------------------------- writing

def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no dates: same input, same bytes
    archive.addfile(info, io.BytesIO(data))


_BLOCK, _RECORD = 512, tarfile.RECORDSIZE  # a tar's block, and what its end is padded to


def _plan(sizes: list[int], order: np.ndarray, shard_bytes: int) -> list[list[int]]:
    """Consecutive runs of ``order`` whose tar (headers, padding, end) fits ``shard_bytes``."""
    groups: list[list[int]] = [[]]
    budget = shard_bytes - _RECORD  # the end-of-archive blocks and the padding to a record
    size = 0
    for index in order:
        # Three headers, the image padded to a block, the class (a block) and the JSON (at
        # most two blocks: paths up to about 900 characters).
        cost = 3 * _BLOCK + -(-sizes[index] // _BLOCK) * _BLOCK + 3 * _BLOCK
        if groups[-1] and size + cost > budget:
            groups.append([])
            size = 0
        groups[-1].append(int(index))
        size += cost
    return groups


def _write_shard(path: Path, scan: FolderScan, indices: list[int],
                 on_image: Callable[[int], None] | None) -> dict:
    """One shard, written under a temporary name and renamed when complete."""
    temporary = path.with_suffix(".tmp")
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as archive:
        for index in indices:
            key = f"{index:09d}"
            extension = scan.paths[index].suffix.lower().lstrip(".") or "img"
            meta = {"label": scan.classes[scan.labels[index]], "path": scan.name(index)}
            if scan.splits is not None:
                meta["split"] = str(scan.splits[index])
            _add(archive, f"{key}.{extension}", scan.paths[index].read_bytes())
            _add(archive, f"{key}.cls", str(int(scan.labels[index])).encode())
            _add(archive, f"{key}.json", json.dumps(meta).encode())
            if on_image is not None:
                on_image(1)
    os.replace(temporary, path)
    per_class = np.bincount(scan.labels[indices], minlength=len(scan.classes))
    return {"name": path.name, "count": len(indices), "bytes": path.stat().st_size,
            "class_counts": per_class.tolist()}


def write_shards(
    scan: FolderScan, folder: str | Path, shard_bytes: int, seed: int = 0,
    on_image: Callable[[int], None] | None = None,
) -> dict:
    """Write ``scan``'s images into tar shards of at most ``shard_bytes`` each (one image more
    when a single image is larger), in a seeded shuffled order so every shard mixes classes;
    then ``dataset.json``, last. Returns the sidecar's contents."""
    from ascension_cli.atomic import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(scan))
    groups = _plan([path.stat().st_size for path in scan.paths], order, shard_bytes)
    shards = [_write_shard(folder / f"shard-{number:06d}.tar", scan, group, on_image)
              for number, group in enumerate(groups)]
    sidecar = {"format": SHARD_FORMAT, "version": 1, "classes": scan.classes,
               "class_counts": np.bincount(scan.labels, minlength=len(scan.classes)).tolist(),
               "count": len(scan), "shards": shards, "seed": seed}
    atomic_write_text(folder / SIDECAR, json.dumps(sidecar, indent=1) + "\n")
    return sidecar


def describe_shards(sidecar: dict, scan: FolderScan) -> str:
    """``40 images of 4 classes into 3 shard(s), 1.2 MiB`` and what the scan skipped."""
    total = sum(shard["bytes"] for shard in sidecar["shards"])
    skipped = f"; {scan.skip_summary()}" if scan.skipped else ""
    return (f"{sidecar['count']} images of {len(sidecar['classes'])} classes into "
            f"{len(sidecar['shards'])} shard(s), {total / 2**20:.1f} MiB{skipped}")


# ---------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ShardSet:
    """Shards to read: their URLs (or paths), image counts, and the classes."""

    source: str
    urls: list[str]
    counts: list[int]
    classes: list[str]
    class_counts: list[int]

    @property
    def count(self) -> int:
        return sum(self.counts)


def _open(url: str):
    if is_url(url):
        try:
            from webdataset import gopen
        except ImportError:
            raise DataError(f"reading {url} needs the webdataset package: pip install "
                            "'ascension-cli[shards]'") from None
        try:
            return gopen(url, "rb")
        except Exception as exc:  # gopen raises whatever its transport raises
            raise DataError(f"cannot open {url}: {str(exc)[:160]}") from None
    try:
        return open(url, "rb")
    except OSError as exc:
        raise DataError(f"cannot read shard {url}: {exc.strerror or exc}") from None


def _read_sidecar(url: str) -> dict:
    """dataset.json, checked to describe Ascension shards. A local one must be a regular file
    (a named pipe would block the read forever)."""
    try:
        if not is_url(url) and not os.path.isfile(url):
            raise DataError(url)
        with _open(url) as handle:
            text = handle.read(MAX_DATASET_JSON_BYTES + 1)
        if len(text) > MAX_DATASET_JSON_BYTES:
            raise ValueError("too large")
        sidecar = json.loads(text.decode("utf-8"))
    except (DataError, ValueError, UnicodeDecodeError, RecursionError):
        raise DataError(f"no readable {SIDECAR} beside the shards ({url}): write shards "
                        "with `ascension shard`, which lists their classes and counts") from None
    if not (isinstance(sidecar, dict) and sidecar.get("format") == SHARD_FORMAT):
        raise DataError(f"{url} does not describe Ascension shards")
    problem = _sidecar_problem(sidecar)
    if problem is not None:
        raise DataError(f"{url}: {problem}; write the shards again with `ascension shard`")
    return sidecar


def _counts_problem(counts: object, classes: int, what: str) -> str | None:
    if not (isinstance(counts, list) and len(counts) == classes
            and all(whole(c) for c in counts)):
        return f"{what} must be {classes} whole numbers (one per class), not {str(counts)[:60]}"
    return None


def _sidecar_problem(sidecar: dict) -> str | None:
    """What is wrong with a dataset.json's fields, or None: every field a reader relies on."""
    classes, shards = sidecar.get("classes"), sidecar.get("shards")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c
                                                          for c in classes)
            and len(set(classes)) == len(classes)):
        return "classes must be a list of distinct, non-empty names"
    problem = _counts_problem(sidecar.get("class_counts"), len(classes), "class_counts")
    if problem is not None:
        return problem
    if not isinstance(shards, list) or not shards:
        return "shards must be a non-empty list"
    names = set()
    for number, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"shards[{number}] is not an object"
        name = shard.get("name")
        if (not isinstance(name, str) or not name or "/" in name or "\\" in name
                or name.startswith(".") or name in names):
            return f"shards[{number}].name must be a distinct plain file name"
        names.add(name)
        if not whole(shard.get("count"), high=MAX_SHARD_SAMPLES):
            return f"shards[{number}].count must be a whole number up to {MAX_SHARD_SAMPLES}"
        if shard.get("class_counts") is not None:
            problem = _counts_problem(shard["class_counts"], len(classes),
                                      f"shards[{number}].class_counts")
            if problem is None and sum(shard["class_counts"]) != shard["count"]:
                problem = f"shards[{number}].class_counts do not add up to its count"
            if problem is not None:
                return problem
    total = sum(shard["count"] for shard in shards)
    if sum(sidecar["class_counts"]) != total or total > MAX_SAMPLES:
        return (f"class_counts add up to {sum(sidecar['class_counts'])}, the shards' counts to "
                f"{total} (at most {MAX_SAMPLES})")
    return None


def open_shards(source: str | Path) -> ShardSet:
    """The shards a folder (all those its dataset.json lists) or a pattern names, checked
    against dataset.json beside them."""
    text = str(source)
    if os.path.isdir(text):
        base, urls = text, None
    else:
        urls = expand_braces(text)
        base = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
    sidecar_url = f"{base}/{SIDECAR}"
    sidecar = _read_sidecar(sidecar_url)
    counts = {shard["name"]: int(shard["count"]) for shard in sidecar["shards"]}
    if urls is None:
        urls = [f"{base}/{name}" for name in counts]
    unknown = [url for url in urls if url.rsplit("/", 1)[-1] not in counts]
    if unknown:
        raise DataError(f"{unknown[0]} is not among the shards {sidecar_url} lists"
                        + (f" ({len(unknown)} such)" if len(unknown) > 1 else ""))
    if not is_url(text):
        missing = [url for url in urls if not os.path.isfile(url)]
        if missing:
            raise DataError(f"shard not found: {missing[0]}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        for url in urls:
            claimed, size = counts[url.rsplit("/", 1)[-1]], os.path.getsize(url)
            if claimed > size // MIN_SAMPLE_BYTES:
                raise DataError(f"{sidecar_url} says {url} holds {claimed} images; a file of "
                                f"{size} bytes cannot: write the shards again with "
                                "`ascension shard`")
    names = [url.rsplit("/", 1)[-1] for url in urls]
    per_shard = {shard["name"]: shard.get("class_counts") for shard in sidecar["shards"]}
    # The classes' counts in the shards chosen (a pattern may name a subset of them).
    class_counts = (np.sum([per_shard[name] for name in names], axis=0).tolist()
                    if all(per_shard[name] is not None for name in names)
                    else list(sidecar["class_counts"]))
    return ShardSet(text, urls, [counts[name] for name in names], list(sidecar["classes"]),
                    [int(count) for count in class_counts])


@dataclass
class Sample:
    key: str
    data: bytes
    label: int
    meta: dict

    @property
    def name(self) -> str:
        """The image's original path when the shard recorded it, else its key."""
        return self.meta.get("path", self.key)


def read_samples(url: str, expected: int | None = None,
                 classes: int | None = None) -> Iterator[Sample]:
    """The samples of one shard, in their order, streamed (the tar is read once, front to back).
    A sample without an image or a class is skipped; a damaged tar, or one holding other than
    the ``expected`` number of samples (a tar cut at a block boundary reads as a shorter one),
    a member past its size bound, or a class or JSON member that is not one (a class index
    outside ``classes``), ends in a DataError naming the shard and member."""
    found = 0
    for sample in _read(url, classes):
        found += 1
        yield sample
    if expected is not None and found != expected:
        raise DataError(f"{url}: a damaged shard (it holds {found} samples where {SIDECAR} "
                        f"says {expected}); write it again")


def _member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo, extension: str,
                  url: str) -> bytes:
    """A member's bytes, refused from its header when larger than its kind may be."""
    bound = MAX_SIDECAR_MEMBER_BYTES if extension in ("cls", "json", "txt") else MAX_IMAGE_BYTES
    if member.size > bound:
        raise DataError(f"{url}: member {member.name[:80]!r} is {member.size:,} bytes, over the "
                        f"bound of {bound:,} for a .{extension[:10]} member")
    return archive.extractfile(member).read()


def _read(url: str, classes: int | None = None) -> Iterator[Sample]:
    current: dict[str, bytes] = {}
    key = None
    with _open(url) as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    stem, _, extension = name.partition(".")
                    if stem != key and key is not None:
                        sample = _sample(key, current, url, classes)
                        if sample is not None:
                            yield sample
                        current = {}
                    key = stem
                    current[extension] = _member_bytes(archive, member, extension, url)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{url}: a damaged shard ({str(exc)[:120]})") from None
    if key is not None:
        sample = _sample(key, current, url, classes)
        if sample is not None:
            yield sample


def _sample(key: str, members: dict[str, bytes], url: str = "shard",
            classes: int | None = None) -> Sample | None:
    """One sample from its members; None without an image or a class. A class or JSON member
    that is not one ends in a DataError naming the shard and the member."""
    image = next((data for extension, data in members.items()
                  if extension not in ("cls", "json", "txt")), None)
    if image is None or "cls" not in members:
        return None
    where = f"{url}: member {key[:80]!r}"
    try:
        label = int(members["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}.cls is not a class index") from None
    if label < 0 or (classes is not None and label >= classes):
        raise DataError(f"{where}.cls is class {label}, outside the {classes} classes of "
                        f"{SIDECAR}")
    try:
        meta = json.loads(members["json"].decode("utf-8")) if "json" in members else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DataError(f"{where}.json is not JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("path", ""), str):
        raise DataError(f"{where}.json is not an object with a text path")
    return Sample(key, image, label, meta)
