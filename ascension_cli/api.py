"""The Python API: train, embed and evaluate from your own scripts, with the options and
checks of the command line (the same pydantic models validate them).

    from ascension_cli import train_supcon, embed, evaluate

    run = train_supcon("data/train", epochs=5, model="tf_efficientnet_lite0",
                       weights="tf_efficientnet_lite0.safetensors", save_dir="runs/a")
    queries = embed(run.best_checkpoint, "data/test")
    print(evaluate(queries).clean.report.recall_at_k)

Heavy modules (torch, timm, faiss) are imported when a function runs, not when this is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascension_cli.config import WARMUP_SHARE, EmbedConfig, TrainConfig, resolve

if TYPE_CHECKING:
    from ascension_cli.embed.vectors import Vectors
    from ascension_cli.retrieval.evaluate import EvaluationRun
    from ascension_cli.train.loop import EpochRecord, Reporter


def _default(field: str) -> Any:
    return TrainConfig.model_fields[field].get_default(call_default_factory=True)


@dataclass
class TrainSummary:
    """What ``train_supcon`` returns."""

    best_recall_at_1: float | None  # best validation Recall@1 of a trained epoch
    epochs_run: int  # epochs trained by this call (a resumed run counts only its own)
    last_checkpoint: Path
    best_checkpoint: Path | None  # None without a validation split
    history: list[EpochRecord]  # one record per epoch, epoch 0 the untrained model


def train_supcon(
    data_root: str | Path,
    batch_size: int | None = None,
    target_batch: int | None = None,
    epochs: int | None = None,
    warmup_epochs: float | None = None,
    lr: float | None = None,
    save_dir: str | Path | None = None,
    reporter: Reporter | None = None,
    **options: Any,
) -> TrainSummary:
    """Train a SupCon embedding model on ``data_root/<class>/<image>``, as ``ascension train``.

    Args:
        data_root: folder of class folders.
        batch_size: images per micro-batch, what fits in memory (default {batch_size}).
        target_batch: images per optimizer step, the batch SupCon contrasts; a multiple of
            batch_size (default {target_batch}).
        epochs: epochs (default {epochs}).
        warmup_epochs: linear LR warmup in epochs, then cosine decay (default: {warmup} of the
            optimizer steps).
        lr: peak learning rate for 32 images per step, scaled to target_batch by lr_scaling
            (default {lr}).
        save_dir: where last.pt, best.pt, metrics.jsonl, training.png and config.yaml go
            (default {save_dir}).
        reporter: receives progress (``ascension_cli.train.loop.Reporter``); silent if None.
        **options: any other option of ``ascension train`` by its name, e.g. ``model=``,
            ``weights=``, ``temperature=``, ``head=``, ``image_size=``, ``resume="auto"``.

    Returns a ``TrainSummary``. A value out of range raises ``ConfigError`` naming the option;
    every error a user can cause is an ``AscensionError``.
    """
    from ascension_cli.train.loop import BEST, LAST, train

    given = dict(options, data_root=data_root, batch_size=batch_size, target_batch=target_batch,
                 epochs=epochs, warmup_epochs=warmup_epochs, lr=lr, save_dir=save_dir)
    settings = resolve(TrainConfig, {k: v for k, v in given.items() if v is not None})
    result = train(settings, reporter)
    best = result.save_dir / BEST
    return TrainSummary(
        best_recall_at_1=result.best_recall_at_1,
        epochs_run=sum(record.loss is not None for record in result.history),
        last_checkpoint=result.save_dir / LAST,
        best_checkpoint=best if best.is_file() else None,
        history=result.history,
    )


if train_supcon.__doc__:
    train_supcon.__doc__ = train_supcon.__doc__.format(
        batch_size=_default("batch_size"), target_batch=_default("target_batch"),
        epochs=_default("epochs"), lr=_default("lr"), save_dir=_default("save_dir"),
        warmup=f"{WARMUP_SHARE:.0%}",
    )


def embed(
    checkpoint: str | Path, image_root: str | Path, output: str | Path | None = None,
    **options: Any,
) -> Vectors:
    """Embed the images under ``image_root`` with a checkpoint's model, as ``ascension embed``.

    ``image_root`` is a folder, a manifest or shards. ``options``: split, features, batch_size,
    precision, workers, device, channels_last, image_size. With ``output`` the vectors file is
    written too. Returns the ``Vectors`` (rows, labels, paths, class names and provenance).
    """
    import tempfile

    from ascension_cli.embed.chunks import embed_in_chunks, finish
    from ascension_cli.embed.vectors import save_vectors

    given = dict(options, checkpoint=checkpoint, image_root=image_root)
    if output is not None:
        given["output"] = output
    settings = resolve(EmbedConfig, given)
    with tempfile.TemporaryDirectory(prefix="ascension-embed-") as scratch:
        # With an output file, finished chunks wait beside it (a rerun resumes); without one,
        # in a scratch folder.
        target = settings.output if output is not None else Path(scratch) / "vectors.npz"
        vectors = embed_in_chunks(settings.checkpoint, settings.image_root, target,
                                  split=settings.split, chunk_size=settings.chunk_size,
                                  feature_kind=settings.features,
                                  image_size=settings.image_size, **settings.run_options())
    if output is not None:
        save_vectors(settings.output, vectors)
        finish(settings.output)
    return vectors


def evaluate(
    queries: Vectors | str | Path,
    gallery: Vectors | str | Path | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    index_kind: str = "flat",
) -> EvaluationRun:
    """Recall@k, Precision@1, R-Precision, MAP@R and per-class Recall@1, as ``ascension eval``.

    ``queries`` and ``gallery`` are ``Vectors`` or vectors files; without a gallery the queries
    are searched among themselves. The metrics are in ``.clean.report``.
    """
    from ascension_cli.embed.vectors import load_vectors
    from ascension_cli.retrieval.evaluate import evaluate_vectors

    def loaded(item):
        return item if item is None or hasattr(item, "vectors") else load_vectors(item)

    return evaluate_vectors(loaded(queries), loaded(gallery), tuple(ks), index_kind)
