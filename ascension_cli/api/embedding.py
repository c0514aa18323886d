"""Embedding from Python, as ``ascension embed`` does it (the command line calls ``run_embed``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascension_cli.config import EmbedConfig, resolve

if TYPE_CHECKING:
    from ascension_cli.embedding.vectors import Vectors
    from ascension_cli.progress import Progress


@dataclass
class EmbedResult:
    """What ``run_embed`` wrote: the vectors (None on a torchrun rank other than 0), the vectors
    file, and the FAISS index file if one was asked for."""

    vectors: Vectors | None
    output: Path | None
    index: Path | None = None


def run_embed(settings: EmbedConfig, progress: Progress | None = None,
              write: bool = True) -> EmbedResult:
    """Embed ``settings.image_root``; with ``write`` the vectors file (and ``settings.index``)
    is written, finished chunks kept beside it until then (a rerun resumes). Under torchrun each
    process embeds its share and rank 0 writes the file."""
    from ascension_cli.embedding.parts import finish
    from ascension_cli.embedding.pipeline import EmbedOptions, embed_across_processes
    from ascension_cli.embedding.vectors import save_vectors
    from ascension_cli.retrieval.index import write_index

    options = EmbedOptions.of(feature_kind=settings.features, image_size=settings.image_size,
                              **settings.run_options())
    vectors = embed_across_processes(
        settings.checkpoint, settings.image_root, settings.output if write else None, options,
        progress, split=settings.split, chunk_size=settings.chunk_size)
    if vectors is None or not write:  # another torchrun rank: rank 0 writes the file
        return EmbedResult(vectors, None)
    save_vectors(settings.output, vectors)
    finish(settings.output)
    if settings.index is not None:
        write_index(settings.index, vectors.vectors)
    return EmbedResult(vectors, settings.output, settings.index)


def parts_kept(settings: EmbedConfig) -> Path:
    """Where the finished chunks of an interrupted ``run_embed`` wait for the next run."""
    from ascension_cli.embedding.parts import parts_folder

    return parts_folder(settings.output)


def main_process() -> bool:
    """Whether this is the process that reports (rank 0 under torchrun, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


def embed(
    checkpoint: str | Path, image_root: str | Path, output: str | Path | None = None,
    progress: Progress | None = None, **options: Any,
) -> Vectors:
    """Embed the images under ``image_root`` with a checkpoint's model, as ``ascension embed``.

    ``image_root`` is a folder, a manifest or shards. ``options`` are ``ascension embed``'s by
    name: split, features, batch_size, precision, workers, device, channels_last, image_size,
    chunk_size, index. With ``output`` the vectors file is written too (and an interrupted run
    resumes). Run under torchrun, each process embeds a share. Returns the ``Vectors`` (rows,
    labels, paths, class names and provenance); None on torchrun ranks other than 0.
    """
    given = dict(options, checkpoint=checkpoint, image_root=image_root)
    if output is not None:
        given["output"] = output
    return run_embed(resolve(EmbedConfig, given), progress, write=output is not None).vectors
