"""The parts folder of an embedding in progress: ``OUTPUT.parts/``, one file per finished chunk.

Each part records what it holds (its chunk, rows, dimension, and digests of its image names and
vectors, under the run's identity); on resume a part that does not match is embedded again with
a note, never joined. The folder is stamped (``identity.json``); one that is not ours is never
touched. Under torchrun rank 0 prepares the folder and every rank takes its share of the chunks
not yet done. ``finish`` removes what Ascension wrote there once the vectors file is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascension_cli.atomic import atomic_write, atomic_write_text
from ascension_cli.errors import DataError
from ascension_cli.runtime import DistributedContext
from ascension_cli.strings import has_strings, packed, unpacked

IDENTITY = "identity.json"
_PART_NAME = re.compile(r"chunk-\d{6,}\.npz|\.chunk-\d{6,}\.npz\..*\.tmp")


def parts_folder(output: str | Path) -> Path:
    return Path(str(output) + ".parts")


@dataclass
class ChunkPlan:
    """How many chunks there are, where they are kept, which this process embeds, and the
    digest of the run's identity that each part records."""

    parts: Path
    chunks: int
    mine: list[int]
    identity_digest: str = ""

    def part(self, chunk: int) -> Path:
        return self.parts / f"chunk-{chunk:06d}.npz"


def plan_chunks(
    output: str | Path, chunks: int, identity: dict, context: DistributedContext,
    barrier: Callable[[], None], on_note: Callable[[str], None],
    check: PartCheck,
) -> ChunkPlan:
    """Rank 0 keeps the parts of an interrupted run with the same identity (else clears them)
    and drops each part that does not pass ``check``; every rank then takes its share of the
    ``chunks`` not yet done."""
    plan = ChunkPlan(parts_folder(output), chunks, [],
                     digest([json.dumps(identity, sort_keys=True)]))
    if context.is_main:
        _prepare(plan.parts, identity, on_note)
        for chunk in range(chunks):
            problem = _check_part(plan.part(chunk), chunk, plan.identity_digest, check)
            if problem is not None:
                on_note(f"chunk {chunk} in {plan.parts} {problem}: embedding it again")
                plan.part(chunk).unlink()
    barrier()
    done = [c for c in range(chunks) if plan.part(c).is_file()]
    if done and context.is_main:
        on_note(f"resuming: {len(done)} of {chunks} chunks were embedded by an earlier run "
                f"({plan.parts})")
    plan.mine = [c for c in range(chunks)
                 if c % context.world_size == context.rank and c not in done]
    return plan


def _ours(parts: Path) -> bool:
    """Whether an existing parts folder is one Ascension made: empty, or stamped."""
    if not any(parts.iterdir()):
        return True
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads((parts / IDENTITY).read_text(encoding="utf-8"))
        return isinstance(saved, dict) and "checkpoint_sha256" in saved and "chunk_size" in saved
    return False


def _prepare(parts: Path, identity: dict, on_note: Callable[[str], None]) -> None:
    if parts.exists() and not parts.is_dir():
        raise DataError(f"{parts} is a file, not the folder of finished chunks that embedding "
                        "keeps there: move it, or choose another -o")
    if parts.is_dir() and not _ours(parts):
        raise DataError(f"{parts} exists and holds files Ascension did not write: move it, or "
                        "choose another -o (nothing in it was touched)")
    saved = None
    with contextlib.suppress(OSError, ValueError):  # no identity, or a half-written one
        saved = json.loads((parts / IDENTITY).read_text(encoding="utf-8"))
    if parts.exists() and saved != identity:
        on_note(f"{parts} holds chunks of another run (other images, model or options): "
                "starting over")
        _remove_parts(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_text(parts / IDENTITY, json.dumps(identity, indent=2) + "\n")


def _remove_parts(parts: Path) -> None:
    """Remove the chunks and identity Ascension wrote there, and the folder if that empties it;
    anything else stays."""
    for path in parts.iterdir():
        if (_PART_NAME.fullmatch(path.name) or path.name == IDENTITY) and path.is_file():
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        parts.rmdir()


def digest(items) -> str:
    hasher = hashlib.sha256()
    for item in items:
        hasher.update(item if isinstance(item, bytes)
                      else str(item).encode("utf-8", "surrogateescape") + b"\n")
    return hasher.hexdigest()


def part_record(chunk: int, identity_digest: str, rows: np.ndarray, vectors: np.ndarray,
            names: list[str]) -> str:
    """What a part says it holds, checked on resume."""
    return json.dumps({"chunk": chunk, "identity": identity_digest, "rows": len(rows),
                       "dimension": int(vectors.shape[1]) if vectors.ndim == 2 else -1,
                       "names_sha256": digest(names),
                       "vectors_sha256": digest([np.ascontiguousarray(vectors).tobytes()])})


@dataclass(frozen=True)
class PartCheck:
    """What a part of each chunk must hold: vectors of ``dim``, rows within ``span(chunk)``
    (start, stop), and images whose names ``names(chunk, part)`` gives."""

    dim: int
    span: Callable[[int], tuple[int, int]]
    names: Callable[[int, dict], list[str]]


def _check_part(path: Path, chunk: int, identity_digest: str, check: PartCheck) -> str | None:
    """Why the part at ``path`` cannot be joined, or None (also when there is none)."""
    if not path.is_file():
        return None
    try:
        part = load_part(path)
        record = json.loads(str(part["record"]))
    except (DataError, KeyError, ValueError):
        return "is damaged or was not written by this version"
    vectors, rows = part["vectors"], part["rows"]
    if record.get("chunk") != chunk or record.get("identity") != identity_digest:
        return "belongs to another chunk or run"
    if not (len(rows) == len(vectors) == len(part["labels"]) == record.get("rows")) or (
            record.get("vectors_sha256") != digest([np.ascontiguousarray(vectors).tobytes()])):
        return "does not hold what it recorded"
    start, stop = check.span(chunk)
    rows = rows.astype(np.int64)
    if len(rows) and (rows.min() < start or rows.max() >= stop or (np.diff(rows) <= 0).any()):
        return "holds rows of other images"
    if len(rows) and (vectors.ndim != 2 or vectors.shape[1] != check.dim):
        return f"holds {vectors.shape[-1]}-d vectors, not {check.dim}-d"
    names = check.names(chunk, part)
    if len(names) != len(rows) or record.get("names_sha256") != digest(names):
        return "holds other images"
    return None


def save_part(path: Path, rows: np.ndarray, vectors: np.ndarray, labels: np.ndarray,
               failed: list[str], names: list[str], record: str,
               keep_names: bool = False) -> None:
    atomic_write(path, lambda handle: np.savez(
        handle, rows=rows, vectors=vectors, labels=labels, **packed("failed", failed),
        **packed("names", names if keep_names else []), record=np.array(record)))


def load_part(path: Path) -> dict:
    """A part's arrays (rows, vectors, labels, record) and its lists of names (failed,
    names); a damaged one is a DataError naming it."""
    try:
        with np.load(path, allow_pickle=False) as part:
            arrays = {key: part[key] for key in ("rows", "vectors", "labels", "record")
                      if key in part.files}
            return {**arrays, **{key: unpacked(part, key) for key in ("failed", "names")
                                 if has_strings(part, key)}}
    except Exception:  # numpy and zipfile raise many kinds for a damaged archive
        raise DataError(f"{path} is damaged: delete it and run the same command again (only "
                        "that chunk is embedded again)") from None


def finish(output: str | Path) -> None:
    """Remove the parts folder (what Ascension wrote there) once the vectors file is written."""
    parts = parts_folder(output)
    if parts.is_dir():
        _remove_parts(parts)
