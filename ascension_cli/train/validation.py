"""What a run measures of its model. Each epoch: the validation photos searched among
themselves (``validation_figures``), which chooses best.pt. For the starting weights and for
best.pt: the validation photos searched among some of the training photos (``gallery_figures``),
the search a catalogue of the training photos makes. With few validation photos the first can
promise gains the second does not see (docs/benchmarks.md, round thirteen), so the second is
what says whether training helped."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader

from ascension_cli.embedding.inference import extract_features
from ascension_cli.errors import CheckpointError, Wording
from ascension_cli.formats import BEST_CHECKPOINT
from ascension_cli.model.checkpoint import load_checkpoint
from ascension_cli.retrieval.evaluate import evaluate
from ascension_cli.train.average import applied, copied
from ascension_cli.train.gradcache import StepAbandoned
from ascension_cli.train.logbook import (
    GALLERY_FIGURES,
    VALIDATION_FIGURES,
    EpochRecord,
    shown_figures,
    start_and_best,
    write_metrics,
)
from ascension_cli.train.stopping import StopRequest, stopped

NOT_MEASURABLE = Wording(
    "validation recall cannot be measured: no validation class has two readable images "
    "(raise {val_fraction} or give {val_root}); best.pt will not be written",
    ("val_fraction", "val_root"))


def gallery_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of up to ``limit`` of the training photos, spread evenly over the
    classes: each class's photos in a random order, the classes taking turns, so a class gives
    up photos only where it holds more than its share. The same for the same labels and seed."""
    labels = np.asarray(labels)
    count = len(labels)
    if limit >= count:
        return np.arange(count)
    order = np.random.default_rng(seed).permutation(count)
    shuffled = labels[order]
    by_class = np.argsort(shuffled, kind="stable")
    grouped = shuffled[by_class]
    turn = np.empty(count, np.int64)  # how many of its class come before it in the order
    turn[by_class] = np.arange(count) - np.searchsorted(grouped, grouped, side="left")
    return np.sort(order[np.lexsort((np.arange(count), turn))[:limit]])


def _embedded(run, loader: DataLoader, on_failed, stop: StopRequest
              ) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features and labels of a loader's readable images, rank 0's plain model; a stop
    asked for meanwhile (once training has started) raises ``StepAbandoned``."""
    should_stop = run.opt.should_stop

    def abandon_if_asked(_: int) -> None:
        if stop.deferring and should_stop is not None and should_stop():
            raise StepAbandoned

    features, labels, _ = extract_features(
        run.nets.model, loader, run.machine.device, "backbone", run.machine.autocast,
        on_failed=on_failed, on_batch=abandon_if_asked, channels_last=run.config.channels_last,
    )
    return features, labels


def _figures(names, queries: np.ndarray, query_labels: np.ndarray,
             gallery: np.ndarray | None = None, gallery_labels: np.ndarray | None = None
             ) -> dict[str, float | None]:
    """Recall@1, recall@5 and MAP@R under ``names``' field names (the evaluator of `ascension
    eval`, so training and eval report the same figures); only recall@1, None, where no query
    has a relevant photo."""
    nothing: dict[str, float | None] = {names[0][0]: None}
    if len(query_labels) == 0 or (gallery_labels is not None and len(gallery_labels) == 0):
        return nothing
    report = evaluate(queries, query_labels, gallery, gallery_labels, ks=(1, 5)).report
    if math.isnan(report.recall_at_k[1]):
        return nothing
    values = (report.recall_at_k[1], report.recall_at_k[5], report.map_at_r)
    return {key: value for (key, _), value in zip(names, values, strict=True)}


def _validation_embedded(run, stop: StopRequest) -> tuple[np.ndarray, np.ndarray]:
    """The validation photos' features with the weight average applied, embedded once for the
    weights of each optimizer step: the start's two searches, and best.pt's search where best.pt
    is the last epoch, reuse the validation's (at the start, the colour test's where it has
    them: ``build.start_features``)."""
    key = ("val", run.opt.scheduler.last_epoch)  # the step: it advances as the weights change
    if key not in run.embedded:
        with applied(run.opt.average):  # with --ema-decay, the average is what is measured
            embedded = _embedded(run, run.loaders.val, run.loaders.val_failures, stop)
        run.embedded.clear()
        run.embedded[key] = embedded
    return run.embedded[key]


def validation_figures(run, stop: StopRequest) -> dict[str, float | None]:
    """Validation recall@1, recall@5 and MAP@R, each photo of the validation split searched
    among the others, under ``EpochRecord``'s field names (recall@1 None, and nothing else,
    where there is nothing to measure). Rank 0 embeds the whole validation split with the
    plain model (no collectives), so the figures are the same whatever the number of
    processes. A stop asked for meanwhile abandons it (a single process only), as it abandons
    a step."""
    if run.loaders.val is None or not run.machine.distributed.is_main:
        return {"val_recall_at_1": None}
    return _figures(VALIDATION_FIGURES, *_validation_embedded(run, stop))


def gallery_figures(run, stop: StopRequest, current: bool = True) -> dict[str, float | None]:
    """The same figures, ``gallery_*``, with each validation photo searched among the
    training photos of ``loaders.gallery`` (``--gallery-check``): for the model as trained so
    far (``current``, its weight average applied, as validation measures it) or for the
    weights the model holds (best.pt read back); {} where that is not measured (rank 0 only)."""
    if run.loaders.gallery is None or not run.machine.distributed.is_main:
        return {}
    if current:
        queries, query_labels = _validation_embedded(run, stop)
    else:
        queries, query_labels = _embedded(run, run.loaders.val, run.loaders.val_failures, stop)
    held = run.embedded.pop(("gallery", run.opt.scheduler.last_epoch), None) if current else None
    if held is not None:  # the start's, embedded by the colour test with these weights
        gallery, gallery_labels = held
    else:
        with applied(run.opt.average if current else None):
            gallery, gallery_labels = _embedded(run, run.loaders.gallery,
                                                run.loaders.gallery_failures, stop)
    figures = _figures(GALLERY_FIGURES, queries, query_labels, gallery, gallery_labels)
    return {} if figures[GALLERY_FIGURES[0][0]] is None else figures


@contextmanager
def read_back(run, best: EpochRecord) -> Iterator[None]:
    """best.pt's weights in the model inside the block (the model validation measured, its
    average already applied), and the model's own weights again after."""
    model = run.nets.model
    held = copied(model.state_dict())
    saved = load_checkpoint(run.save_dir / BEST_CHECKPOINT)["model"]
    try:
        with torch.no_grad():
            model.load_state_dict(saved)
        yield
    finally:
        with torch.no_grad():
            model.load_state_dict(held)


def start_text(run, figures: dict[str, float | None]) -> str:
    """"before training: validation recall@1 ...; among 533 training photos: recall@1 ..."."""
    text = f"before training: validation {shown_figures(figures)}"
    if figures.get(GALLERY_FIGURES[0][0]) is None:
        return text
    photos = len(run.loaders.gallery.dataset)
    return f"{text}; among {photos} training photos: {shown_figures(figures, GALLERY_FIGURES)}"


def measure_best(run, history: list[EpochRecord], stop: StopRequest) -> None:
    """After the last epoch: the validation photos searched among the training photos with
    best.pt, as they were with the starting weights (``--gallery-check``), into best.pt's
    record and metrics.jsonl. A stop asked for meanwhile ends the run there."""
    pair = start_and_best(history)
    if (pair is None or pair[0].gallery_recall_at_1 is None
            or pair[1].gallery_recall_at_1 is not None):
        return  # best.pt is the start, the start was not measured, or best.pt was
    best = pair[1]
    try:
        if best.epoch == history[-1].epoch:  # best.pt is the model as it is
            figures = gallery_figures(run, stop)
        else:
            with read_back(run, best):
                figures = gallery_figures(run, stop, current=False)
    except StepAbandoned:
        stopped(stop.signal_number, "after the last epoch, in the check of best.pt against "
                "the training photos; best.pt and last.pt are complete")
    except CheckpointError as exc:  # best.pt removed or changed while the run went on
        run.reporter.message(f"best.pt was not searched among the training photos: {exc}")
        return
    for key, value in figures.items():
        setattr(best, key, value)
    if figures:  # the summary prints them beside the start's (cli/console.py)
        write_metrics(run.save_dir, history)
