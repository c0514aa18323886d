"""Embedding a large image set: in chunks that survive an interruption, split across processes.

``embed`` writes each chunk of ``chunk_size`` images to ``<output>.parts/`` as it finishes. A run
that stops (Ctrl-C, a crash, a lost machine) leaves the finished chunks there; the same command
again embeds only the missing ones. Each part records what it holds (its chunk, rows, dimension,
and digests of its image names and vectors, under the run's identity); on resume a part that
does not match is embedded again with a note, never joined. Under torchrun each rank embeds the
chunks ``c`` with ``c % world_size == rank`` and rank 0 joins them in chunk order. Every chunk
is batched the same way however many processes there are, so the file is the one a single
process writes, row for row. The parts folder is removed once the vectors file is written.
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
from ascension_cli.data.augment import eval_transform
from ascension_cli.data.folder import FolderScan
from ascension_cli.data.manifest import for_evaluation, scan_any
from ascension_cli.data.shards import is_shards, open_shards, read_samples
from ascension_cli.data.stream import SampleDataset
from ascension_cli.embed.images import embed_dataset, embed_images, vectors_of
from ascension_cli.embed.vectors import Vectors, sha256_of
from ascension_cli.errors import DataError
from ascension_cli.model.checkpoint import load_model
from ascension_cli.runtime import DistributedContext

DEFAULT_CHUNK = 4096
IDENTITY = "identity.json"
PARTS_FORMAT = "ascension-embed-parts"  # stamped in identity.json: the folder is ours
_PART_NAME = re.compile(r"chunk-\d{6,}\.npz|\.chunk-\d{6,}\.npz\..*\.tmp")


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


def parts_folder(output: str | Path) -> Path:
    return Path(str(output) + ".parts")


def _identity(scan: FolderScan, checkpoint_sha: str, chunk_size: int, options: dict) -> dict:
    """What makes finished chunks reusable: the same images, model, chunking and options."""
    listing = hashlib.sha256()
    for index in range(len(scan)):
        listing.update(f"{scan.name(index)}\t{scan.labels[index]}\n".encode("utf-8",
                                                                          "surrogateescape"))
    return {"format": PARTS_FORMAT, "checkpoint_sha256": checkpoint_sha, "images": len(scan),
            "listing_sha256": listing.hexdigest(), "chunk_size": chunk_size,
            **{key: options.get(key) for key in ("feature_kind", "image_size", "precision")}}


def plan_chunks(
    output: str | Path, chunks: int, identity: dict, context: DistributedContext,
    barrier: Callable[[], None], on_note: Callable[[str], None],
    check: PartCheck,
) -> ChunkPlan:
    """Rank 0 keeps the parts of an interrupted run with the same identity (else clears them)
    and drops each part that does not pass ``check``; every rank then takes its share of the
    ``chunks`` not yet done."""
    plan = ChunkPlan(parts_folder(output), chunks, [],
                     _digest([json.dumps(identity, sort_keys=True)]))
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


def _digest(items) -> str:
    hasher = hashlib.sha256()
    for item in items:
        hasher.update(item if isinstance(item, bytes)
                      else str(item).encode("utf-8", "surrogateescape") + b"\n")
    return hasher.hexdigest()


def _record(chunk: int, identity_digest: str, rows: np.ndarray, vectors: np.ndarray,
            names: list[str]) -> str:
    """What a part says it holds, checked on resume."""
    return json.dumps({"chunk": chunk, "identity": identity_digest, "rows": len(rows),
                       "dimension": int(vectors.shape[1]) if vectors.ndim == 2 else -1,
                       "names_sha256": _digest(names),
                       "vectors_sha256": _digest([np.ascontiguousarray(vectors).tobytes()])})


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
        part = _load_part(path)
        record = json.loads(str(part["record"]))
    except (DataError, KeyError, ValueError):
        return "is damaged or was not written by this version"
    vectors, rows = part["vectors"], part["rows"]
    if record.get("chunk") != chunk or record.get("identity") != identity_digest:
        return "belongs to another chunk or run"
    if not (len(rows) == len(vectors) == len(part["labels"]) == record.get("rows")) or (
            record.get("vectors_sha256") != _digest([np.ascontiguousarray(vectors).tobytes()])):
        return "does not hold what it recorded"
    start, stop = check.span(chunk)
    rows = rows.astype(np.int64)
    if len(rows) and (rows.min() < start or rows.max() >= stop or (np.diff(rows) <= 0).any()):
        return "holds rows of other images"
    if len(rows) and (vectors.ndim != 2 or vectors.shape[1] != check.dim):
        return f"holds {vectors.shape[-1]}-d vectors, not {check.dim}-d"
    names = check.names(chunk, part)
    if len(names) != len(rows) or record.get("names_sha256") != _digest(names):
        return "holds other images"
    return None


def _save_part(path: Path, rows: np.ndarray, vectors: np.ndarray, labels: np.ndarray,
               failed: list[str], names: list[str], record: str,
               keep_names: bool = False) -> None:
    atomic_write(path, lambda handle: np.savez(
        handle, rows=rows, vectors=vectors, labels=labels, failed=np.array(failed, dtype=str),
        names=np.array(names if keep_names else [], dtype=str), record=np.array(record)))


def _load_part(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as part:
            return {key: part[key] for key in ("rows", "vectors", "labels", "failed", "names",
                                               "record") if key in part.files}
    except Exception:  # numpy and zipfile raise many kinds for a damaged archive
        raise DataError(f"{path} is damaged: delete it and run the same command again (only "
                        "that chunk is embedded again)") from None


def _folder_check(scan: FolderScan, chunk_size: int, dim: int) -> PartCheck:
    """A folder or manifest chunk holds rows of its range; their names come from the scan."""
    return PartCheck(
        dim, lambda chunk: (chunk * chunk_size, min(len(scan), (chunk + 1) * chunk_size)),
        lambda chunk, part: [scan.name(int(row)) for row in part["rows"]])


def embed_in_chunks(
    checkpoint: str | Path,
    image_root: str | Path,
    output: str | Path,
    split: str | None = None,
    evaluation: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    context: DistributedContext | None = None,
    barrier: Callable[[], None] = lambda: None,
    on_note: Callable[[str], None] = lambda _: None,
    **options,
) -> Vectors | None:
    """Embed ``image_root`` chunk by chunk (see the module notes); rank 0 returns the joined
    ``Vectors``, other ranks None. ``options`` are ``embed_images``' (on_start counts this
    process's remaining images)."""
    context = context or DistributedContext()
    if is_shards(image_root):
        if split is not None or evaluation:
            raise DataError("--split and a manifest's query/gallery flags apply to manifests, "
                            "not shards")
        return embed_shards(checkpoint, image_root, output, context, barrier, on_note,
                            **options)
    model, spec, _ = load_model(checkpoint)
    scan = scan_any(image_root, split)
    if evaluation:
        scan = for_evaluation(scan)
    checkpoint_sha = sha256_of(checkpoint)
    identity = _identity(scan, checkpoint_sha, chunk_size, options)
    dim = spec.feature_dim(options.get("feature_kind", "backbone"))
    plan = plan_chunks(output, -(-len(scan) // chunk_size), identity, context, barrier,
                       on_note, _folder_check(scan, chunk_size, dim))
    on_start = options.pop("on_start", None)
    on_failed = options.pop("on_failed", None)
    if on_start is not None:
        on_start(sum(len(range(c * chunk_size, min(len(scan), (c + 1) * chunk_size)))
                     for c in plan.mine))
    for chunk in plan.mine:
        rows = np.arange(chunk * chunk_size, min(len(scan), (chunk + 1) * chunk_size))
        failed: list[str] = []

        def record(failure, rows=rows, failed=failed) -> None:
            failed.append(scan.name(int(rows[failure.index])))
            if on_failed is not None:
                on_failed(failure)

        vectors, labels, kept = embed_images(
            model, spec, [scan.paths[i] for i in rows], scan.labels[rows], on_failed=record,
            **options)
        names = [scan.name(int(r)) for r in rows[kept]]
        _save_part(plan.part(chunk), rows[kept], vectors, labels, failed, names,
                   _record(chunk, plan.identity_digest, rows[kept], vectors, names))
    barrier()
    if not context.is_main:
        return None
    return _join(plan, scan, spec.name, checkpoint_sha, options.get("feature_kind", "backbone"),
                 image_root)


def _joined(plan: ChunkPlan, source: str | Path) -> dict[str, np.ndarray | list[str]]:
    """The chunks' rows, vectors, labels, names and failures, in chunk order (the order of a
    single process)."""
    parts = [_load_part(plan.part(chunk)) for chunk in range(plan.chunks)]
    kept = [part for part in parts if len(part["rows"])]
    if not kept:
        raise DataError(f"no readable images in {source}")
    return {
        "rows": np.concatenate([part["rows"] for part in kept]).astype(np.int64),
        "vectors": np.concatenate([part["vectors"] for part in kept]),
        "labels": np.concatenate([part["labels"] for part in kept]).astype(np.int64),
        "names": [name for part in kept for name in part["names"].tolist()],
        "failed": [name for part in parts for name in part["failed"].tolist()],
    }


def _join(plan: ChunkPlan, scan: FolderScan, model_name: str, checkpoint_sha: str,
          feature_kind: str, image_root: str | Path) -> Vectors:
    """The chunks of a folder or manifest as one Vectors, with its roles and item ids."""
    joined = _joined(plan, image_root)
    return vectors_of(scan, joined["rows"], joined["vectors"], joined["labels"], model_name,
                      checkpoint_sha, feature_kind, joined["failed"])


def embed_shards(
    checkpoint: str | Path, source: str | Path, output: str | Path,
    context: DistributedContext, barrier: Callable[[], None], on_note: Callable[[str], None],
    image_size: int | None = None, **options,
) -> Vectors | None:
    """``embed_in_chunks`` for shards: a chunk is a shard, each kept as it finishes."""
    shards = open_shards(source)
    model, spec, _ = load_model(checkpoint)
    checkpoint_sha = sha256_of(checkpoint)
    identity = {"format": PARTS_FORMAT, "checkpoint_sha256": checkpoint_sha,
                "shards": shards.urls,
                "counts": shards.counts, "chunk_size": "shard", "image_size": image_size,
                **{key: options.get(key) for key in ("feature_kind", "precision")}}
    dim = spec.feature_dim(options.get("feature_kind", "backbone"))
    plan = plan_chunks(output, len(shards.urls), identity, context, barrier, on_note,
                       _shard_check(shards.counts, dim))
    on_start = options.pop("on_start", None)
    if on_start is not None:
        on_start(sum(shards.counts[chunk] for chunk in plan.mine))
    size = image_size or spec.image_size
    transform = eval_transform(size, spec.mean, spec.std, spec.crop_pct)
    for chunk in plan.mine:
        # Read once (checked against its count), held in memory while loader workers decode.
        samples = list(read_samples(shards.urls[chunk], shards.counts[chunk],
                                    len(shards.classes)))
        failed: list[str] = []
        on_failed = options.get("on_failed")

        def record(failure, samples=samples, failed=failed, on_failed=on_failed) -> None:
            failed.append(samples[failure.index].name)
            if on_failed is not None:
                on_failed(failure)

        vectors, labels, kept = embed_dataset(
            model, SampleDataset(samples, transform, min_side=2 * size),
            **{**options, "on_failed": record})
        names = [samples[i].name for i in kept]
        _save_part(plan.part(chunk), kept, vectors, labels, failed, names,
                   _record(chunk, plan.identity_digest, kept, vectors, names),
                   keep_names=True)
    barrier()
    if not context.is_main:
        return None
    joined = _joined(plan, source)
    return Vectors(
        vectors=joined["vectors"], labels=joined["labels"], paths=joined["names"],
        class_names=shards.classes, model_name=spec.name, checkpoint_sha256=checkpoint_sha,
        feature_kind=options.get("feature_kind", "backbone"), image_root=str(source),
        failed=joined["failed"],
    )


def _shard_check(counts: list[int], dim: int) -> PartCheck:
    """A shard's part holds rows within the shard, and the names of its samples."""
    return PartCheck(dim, lambda chunk: (0, counts[chunk]),
                     lambda chunk, part: part["names"].tolist())


def finish(output: str | Path) -> None:
    """Remove the parts folder (what Ascension wrote there) once the vectors file is written."""
    parts = parts_folder(output)
    if parts.is_dir():
        _remove_parts(parts)


def embed_across_processes(
    checkpoint: str | Path, image_root: str | Path, output: str | Path, device: str = "auto",
    **options,
) -> Vectors | None:
    """``embed_in_chunks`` in this process, or as one rank of torchrun's process group (each
    rank on its own GPU); rank 0 returns the Vectors, the others None."""
    import torch
    import torch.distributed as dist

    from ascension_cli.runtime import init_distributed, launched_by_torchrun, resolve_device

    if not launched_by_torchrun():
        return embed_in_chunks(checkpoint, image_root, output, device=device, **options)
    run_device = resolve_device(device)
    context = init_distributed(run_device)
    if run_device.type == "cuda":
        run_device = torch.device("cuda", context.local_rank)
    try:
        return embed_in_chunks(checkpoint, image_root, output, device=str(run_device),
                               context=context, barrier=dist.barrier, **options)
    finally:
        dist.destroy_process_group()
