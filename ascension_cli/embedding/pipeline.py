"""The one embedding pipeline: a checkpoint's model over a folder, a manifest or shards.

The images are cut into chunks (``chunk_size`` images of a folder or manifest; a shard each for
shards) and each chunk's vectors become a part. With an output file the parts are kept in
``OUTPUT.parts/`` as they finish (see ``parts.py``), so an interrupted run, started again, embeds
only the rest, and torchrun ranks share the chunks; without one (``embed_folder``, the plain
case) the images are one chunk held in memory. Either way rank 0 joins the parts in chunk order,
so the vectors are the ones a single process computes, row for row.

Options are resolved once into an ``EmbedOptions`` (device, precision and loader processes
included); progress goes to one ``Progress``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ascension_cli.data.dataset import (
    EvalDataset,
    Failed,
    collate,
    eval_input,
    eval_photos,
    min_decode_side,
)
from ascension_cli.data.folder import FolderScan
from ascension_cli.data.manifest import for_evaluation, scan_any
from ascension_cli.data.shards import ShardSet, is_shards, open_shards, read_samples
from ascension_cli.data.stream import SampleDataset
from ascension_cli.embedding.inference import extract_features
from ascension_cli.embedding.parts import (
    PartCheck,
    load_part,
    part_record,
    plan_chunks,
    save_part,
)
from ascension_cli.embedding.vectors import Vectors, sha256_of
from ascension_cli.errors import DataError
from ascension_cli.formats import PARTS_CHUNK, PARTS_FORMAT
from ascension_cli.model.backbone import EmbeddingModel, ModelSpec
from ascension_cli.model.checkpoint import load_model
from ascension_cli.progress import Progress
from ascension_cli.runtime import (
    DistributedContext,
    autocast_factory,
    resolve_device,
    resolve_precision,
    resolve_workers,
    use_channels_last,
)


@dataclass(frozen=True)
class EmbedOptions:
    """How a model runs over images, as given; ``resolved()`` adds what the machine decides
    (the device, the precision, the loader processes), once."""

    feature_kind: str = "backbone"
    batch_size: int = 64
    precision: str = "auto"
    workers: int | None = 0
    device: str | torch.device = "auto"
    channels_last: bool = True
    image_size: int | None = None
    recolouring: str | None = None

    @classmethod
    def of(cls, **options: Any) -> EmbedOptions:
        """From keyword options (``ascension embed``'s names); an unknown one is a TypeError."""
        known = {field.name for field in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown embedding option(s): {', '.join(sorted(unknown))}")
        return cls(**options)

    def resolved(self) -> ResolvedOptions:
        """Once: a device already resolved (a torchrun rank's GPU) is taken as it is."""
        device = (self.device if isinstance(self.device, torch.device)
                  else resolve_device(self.device))
        return ResolvedOptions(self, device, resolve_precision(self.precision, device),
                               resolve_workers(self.workers, device))


def settled_options(**options: Any) -> dict[str, Any]:
    """``options`` (``EmbedOptions``' keywords) with the device, precision and loader
    processes decided now. A service settles them once at start, so an unusable ``--device``
    fails there rather than at the first request, and no batch decides them again."""
    resolved = EmbedOptions.of(**options).resolved()
    return dict(options, device=resolved.device, precision=resolved.precision,
                workers=resolved.workers)


@dataclass(frozen=True)
class ResolvedOptions:
    given: EmbedOptions
    device: torch.device
    precision: str
    workers: int


def embed_dataset(model: EmbeddingModel, dataset: Dataset, options: ResolvedOptions,
                  progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, labels, dataset indices) of the readable items of an eval dataset (items
    ``(image, label, index)``, or ``Failed``)."""
    progress = progress or Progress()
    device, given = options.device, options.given
    loader = DataLoader(dataset, batch_size=given.batch_size, collate_fn=collate,
                        num_workers=options.workers, pin_memory=device.type == "cuda")
    return extract_features(
        use_channels_last(model.to(device), given.channels_last), loader, device,
        given.feature_kind, autocast_factory(options.precision, device), progress.failed,
        progress.advance, given.channels_last,
    )


def decode_side(spec: ModelSpec, options: EmbedOptions) -> int:
    """The short side a JPEG may be decoded down to (``decode_image``'s ``min_side``): twice
    the input size, so the eval transform gets the same image whoever decodes it."""
    return min_decode_side(options.image_size or spec.image_size)


def image_dataset(spec: ModelSpec, paths: list[Path], labels: np.ndarray | None,
                  options: EmbedOptions, decoded: list[np.ndarray] | None = None) -> EvalDataset:
    """The images with the spec's eval transform (and ``options.recolouring``); ``decoded``:
    the images already decoded (``decode_side``), in the order of ``paths``."""
    return eval_photos(spec, paths, labels, image_size=options.image_size,
                       recolouring=options.recolouring, cache=decoded)


def embed_images(
    model: EmbeddingModel, spec: ModelSpec, paths: list[Path], labels: np.ndarray | None = None,
    progress: Progress | None = None, **options: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, labels, indices into ``paths``) of the readable images; ``options`` are
    ``EmbedOptions``' (feature_kind, batch_size, precision, workers, device, ...).
    ``progress.start`` is told how many images there are."""
    given, progress = EmbedOptions.of(**options), progress or Progress()
    dataset = image_dataset(spec, paths, labels, given)
    progress.start(len(dataset))
    return embed_dataset(model, dataset, given.resolved(), progress)


def embed_decoded(model: EmbeddingModel, spec: ModelSpec, images: list[np.ndarray],
                  **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, indices into ``images``) of images already decoded (RGB, by ``decode_image``
    with ``decode_side``): the same transform and forward pass as ``embed_images``, without
    reading or decoding anything again (the service decodes each upload once, under its own
    pixel limit)."""
    given = EmbedOptions.of(**options)
    names = [Path(f"image-{number}") for number in range(len(images))]
    vectors, _, indices = embed_dataset(model, image_dataset(spec, names, None, given, images),
                                        given.resolved())
    return vectors, indices


class _Recording(Progress):
    """Forwards progress, and names each unreadable image of the chunk being embedded."""

    def __init__(self, progress: Progress, name_of: Callable[[int], str]):
        self.progress, self.name_of, self.names = progress, name_of, []

    def advance(self, count: int) -> None:
        self.progress.advance(count)

    def failed(self, failure: Failed) -> None:
        self.names.append(self.name_of(failure.index))
        self.progress.failed(failure)


@dataclass(frozen=True)
class _Source:
    """The images as chunks: how many, what identifies them, what each part must hold, how
    many images some chunks hold, each chunk's dataset and names, and how the parts join."""

    chunks: int
    identity: dict
    check: PartCheck
    count: Callable[[list[int]], int]
    chunk: Callable[[int], tuple[Dataset, Callable[[int], int], Callable[[int], str]]]
    join: Callable[[dict[str, Any]], Vectors]
    keep_names: bool = False


def _folder_source(scan: FolderScan, spec: ModelSpec, options: EmbedOptions, chunk_size: int,
                   checkpoint_sha: str) -> _Source:
    def span(chunk: int) -> tuple[int, int]:
        return chunk * chunk_size, min(len(scan), (chunk + 1) * chunk_size)

    def chunk_of(chunk: int):
        rows = np.arange(*span(chunk))
        dataset = image_dataset(spec, [scan.paths[i] for i in rows], scan.labels[rows], options)
        return dataset, lambda i: int(rows[i]), lambda i: scan.name(int(rows[i]))

    listing = hashlib.sha256()
    for index in range(len(scan)):
        listing.update(f"{scan.name(index)}\t{scan.labels[index]}\n".encode(
            "utf-8", "surrogateescape"))
    identity = {"format": PARTS_FORMAT, "checkpoint_sha256": checkpoint_sha, "images": len(scan),
                "listing_sha256": listing.hexdigest(), "chunk_size": chunk_size,
                "feature_kind": options.feature_kind, "image_size": options.image_size,
                "precision": options.precision}
    dim = spec.feature_dim(options.feature_kind)
    check = PartCheck(dim, span, lambda chunk, part: [scan.name(int(r)) for r in part["rows"]])
    return _Source(
        -(-len(scan) // chunk_size), identity, check,
        lambda chunks: sum(len(range(*span(c))) for c in chunks), chunk_of,
        lambda joined: vectors_of(scan, joined["rows"], joined["vectors"], joined["labels"],
                                  spec.name, checkpoint_sha, options.feature_kind,
                                  joined["failed"]))


def _shard_source(shards: ShardSet, source, spec: ModelSpec, options: EmbedOptions,
                  checkpoint_sha: str) -> _Source:
    transform, min_side = eval_input(spec, options.image_size)

    def chunk_of(chunk: int):
        # Read once (checked against its count), held in memory while loader workers decode.
        samples = list(read_samples(shards.urls[chunk], shards.counts[chunk],
                                    len(shards.classes)))
        return (SampleDataset(samples, transform, min_side=min_side), int,
                lambda i: samples[i].name)

    identity = {"format": PARTS_FORMAT, "checkpoint_sha256": checkpoint_sha,
                "shards": shards.urls, "counts": shards.counts, "chunk_size": "shard",
                "image_size": options.image_size, "feature_kind": options.feature_kind,
                "precision": options.precision}
    check = PartCheck(spec.feature_dim(options.feature_kind),
                      lambda chunk: (0, shards.counts[chunk]),
                      lambda chunk, part: part["names"])
    return _Source(
        len(shards.urls), identity, check, lambda chunks: sum(shards.counts[c] for c in chunks),
        chunk_of,
        lambda joined: Vectors(
            vectors=joined["vectors"], labels=joined["labels"], paths=joined["names"],
            class_names=shards.classes, model_name=spec.name, checkpoint_sha256=checkpoint_sha,
            feature_kind=options.feature_kind, image_root=str(source), failed=joined["failed"]),
        keep_names=True)


def _source(image_root, spec: ModelSpec, options: EmbedOptions, split: str | None,
            evaluation: bool, chunk_size: int | None, checkpoint_sha: str) -> _Source:
    if is_shards(image_root):
        if split is not None or evaluation:
            raise DataError("{split} and a manifest's query/gallery flags apply to manifests, "
                            "not shards", options=("split",))
        return _shard_source(open_shards(image_root), image_root, spec, options,
                             checkpoint_sha)
    scan = scan_any(image_root, split)
    if evaluation:
        scan = for_evaluation(scan)
    return _folder_source(scan, spec, options, chunk_size or max(1, len(scan)), checkpoint_sha)


def embed_source(
    checkpoint: str | Path, image_root: str | Path, output: str | Path | None = None,
    options: EmbedOptions | None = None, progress: Progress | None = None,
    split: str | None = None, evaluation: bool = False, chunk_size: int | None = PARTS_CHUNK,
    context: DistributedContext | None = None, barrier: Callable[[], None] = lambda: None,
) -> Vectors | None:
    """Embed ``image_root`` (see the module notes): only ``split``'s rows of a manifest when
    given, only those flagged query or gallery when ``evaluation``. With ``output`` the parts
    are kept beside it; ``chunk_size`` None makes a folder one chunk. Rank 0 returns the joined
    ``Vectors``, other ranks None; ``progress.start`` counts this process's images to embed."""
    options, progress = options or EmbedOptions(), progress or Progress()
    context = context or DistributedContext()
    model, spec, _ = load_model(checkpoint)
    checkpoint_sha = sha256_of(checkpoint)
    source = _source(image_root, spec, options, split, evaluation, chunk_size, checkpoint_sha)
    kept: dict[int, dict[str, Any]] = {}  # parts in memory, without an output file
    if output is None:
        mine, part_path = list(range(source.chunks)), None
    else:
        plan = plan_chunks(output, source.chunks, source.identity, context, barrier,
                           progress.note, source.check)
        mine, part_path = plan.mine, plan.part
    resolved = options.resolved()
    progress.start(source.count(mine))
    for chunk in mine:
        dataset, row_of, name_of = source.chunk(chunk)
        recording = _Recording(progress, name_of)
        vectors, labels, indices = embed_dataset(model, dataset, resolved, recording)
        rows = np.array([row_of(int(i)) for i in indices], dtype=np.int64)
        names = [name_of(int(i)) for i in indices]
        if part_path is None:
            kept[chunk] = {"rows": rows, "vectors": vectors, "labels": labels,
                           "failed": list(recording.names), "names": list(names)}
        else:
            save_part(part_path(chunk), rows, vectors, labels, recording.names, names,
                      part_record(chunk, plan.identity_digest, rows, vectors, names),
                      keep_names=source.keep_names)
    barrier()
    if not context.is_main:
        return None
    parts = [kept[c] if part_path is None else load_part(part_path(c))
             for c in range(source.chunks)]
    return source.join(_joined(parts, image_root))


def _joined(parts: list[dict[str, np.ndarray]], source) -> dict[str, Any]:
    """The chunks' rows, vectors, labels, names and failures, in chunk order (the order of a
    single process)."""
    kept = [part for part in parts if len(part["rows"])]
    if not kept:
        raise DataError(f"no readable images in {source}")
    return {
        "rows": np.concatenate([part["rows"] for part in kept]).astype(np.int64),
        "vectors": np.concatenate([part["vectors"] for part in kept]),
        "labels": np.concatenate([part["labels"] for part in kept]).astype(np.int64),
        "names": [name for part in kept for name in part["names"]],
        "failed": [name for part in parts for name in part["failed"]],
    }


def embed_folder(checkpoint: str | Path, image_root: str | Path, split: str | None = None,
                 evaluation: bool = False, progress: Progress | None = None,
                 **options: Any) -> Vectors:
    """Every image under ``image_root`` in memory: ``embed_source``'s one-chunk case.
    ``options`` are ``EmbedOptions``'."""
    return embed_source(checkpoint, image_root, None, EmbedOptions.of(**options), progress,
                        split, evaluation, chunk_size=None)


def embed_across_processes(checkpoint, image_root, output, options: EmbedOptions,
                           progress: Progress | None = None, **source: Any) -> Vectors | None:
    """``embed_source`` in this process, or as one rank of torchrun's process group (each rank
    on its own GPU); rank 0 returns the Vectors, the others None."""
    import torch.distributed as dist

    from ascension_cli.runtime import init_distributed, launched_by_torchrun

    if not launched_by_torchrun():
        return embed_source(checkpoint, image_root, output, options, progress, **source)
    device = resolve_device(str(options.device))
    context = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    try:
        return embed_source(checkpoint, image_root, output, replace(options, device=device),
                            progress, context=context, barrier=dist.barrier, **source)
    finally:
        dist.destroy_process_group()


def vectors_of(
    scan: FolderScan, indices: np.ndarray, features: np.ndarray, labels: np.ndarray,
    model_name: str, checkpoint_sha256: str, feature_kind: str, failed: list[str],
) -> Vectors:
    """The vectors file's contents for the embedded images ``indices`` of ``scan``, with a
    manifest's query/gallery roles and item ids carried along."""

    def pick(values):
        return None if values is None else np.asarray(values)[indices]

    return Vectors(
        vectors=features, labels=labels, paths=[scan.name(i) for i in indices],
        class_names=scan.classes, model_name=model_name, checkpoint_sha256=checkpoint_sha256,
        feature_kind=feature_kind, image_root=str(scan.root.resolve()), failed=failed,
        is_query=pick(scan.is_query), is_gallery=pick(scan.is_gallery),
        item_ids=None if scan.item_ids is None else [scan.item_ids[i] for i in indices],
    )
