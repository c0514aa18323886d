"""Calibrating a catalogue: the similarity threshold below which a photo is "not in the
catalogue", chosen on labelled photos so that at most a target share of photos of items the
catalogue lacks (the false match rate) would be accepted, and written into catalog.json with
what it measured. ``search`` and ``serve`` then use it unless told another threshold."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascension_cli.catalog.folder_store import store_of
from ascension_cli.catalog.history import change, local_user
from ascension_cli.catalog.search import CatalogSearcher
from ascension_cli.catalog.store import Catalog
from ascension_cli.data.manifest import scan_any
from ascension_cli.errors import DataError
from ascension_cli.progress import Progress
from ascension_cli.retrieval.openset import (
    OpenSetReport,
    calibrated_threshold,
    evaluate_open_set,
    held_out_classes,
    rates_at,
)


def _query_labels(catalog: Catalog, classes: list[str], labels: np.ndarray
                  ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Query labels numbered as the catalogue's classes, those it lacks after them; all class
    names; the labels of the lacking classes."""
    names = list(catalog.class_names)
    lacking = [name for name in classes if name not in names]
    names += lacking
    position = {name: label for label, name in enumerate(names)}
    mapped = np.array([position[classes[label]] for label in labels], np.int64)
    return mapped, names, np.array([position[name] for name in lacking], np.int64)


# Known photos this similar to their top match are taken for the catalogue's own.
SAME_PHOTO = 1 - 1e-4


def _warnings(report, catalog: Catalog, paths: list[Path], known: np.ndarray) -> list[str]:
    """What makes this calibration's figures read better than new photos will: known photos
    that are the catalogue's own (the same file, or a copy), which it finds at similarity 1."""
    held = set(catalog.paths)
    own = sum(Path(path).resolve().as_posix() in held
              for path, is_known in zip(paths, known, strict=True) if is_known)
    copies = int((report.known_scores >= SAME_PHOTO).sum())
    count = max(own, copies)
    if count == 0 or 2 * count < report.known_queries:
        return []
    return [f"{count} of the {report.known_queries} known photos are in the catalogue already "
            "(found at similarity 1): its FNMR and AUC read better than new photos will; "
            "calibrate on photos it was not built from"]


@dataclass(frozen=True)
class Measured:
    """Labelled photos searched in a catalogue: the open-set report and the figures at the
    threshold its unknowns give for the target FMR."""

    report: OpenSetReport
    figures: dict  # threshold, fmr, fnmr, recall_at_1_accepted, recall_at_1_known


def measure(vectors: np.ndarray, labels: np.ndarray, gallery: np.ndarray,
            gallery_labels: np.ndarray, unknown: np.ndarray, names: list[str],
            target_fmr: float) -> Measured:
    """Search the photos (``vectors``, ``labels`` numbered as ``names``) among ``gallery``,
    the ``unknown`` classes held out, and choose the threshold for ``target_fmr``
    (``retrieval.openset.calibrated_threshold``)."""
    report = evaluate_open_set(vectors, labels, gallery, gallery_labels, unknown, names,
                               target_fmr)
    threshold = calibrated_threshold(report.unknown_scores, target_fmr)
    fmr, fnmr, recall = rates_at(report.known_scores, report.known_correct,
                                 report.unknown_scores, threshold)
    known = float(np.mean(report.known_correct)) if len(report.known_correct) else 0.0
    return Measured(report, {"threshold": threshold, "fmr": fmr, "fnmr": fnmr,
                             "recall_at_1_accepted": recall, "recall_at_1_known": known})


def labelled_photos(catalog: Catalog, images: str | Path, split: str | None = None):
    """The labelled photos of ``images`` (class folders or a manifest): their scan."""
    scan = scan_any(images, split)
    if not len(scan.labels) or (scan.labels < 0).any():
        raise DataError(f"{images}: calibration needs labelled photos (class folders or a "
                        "manifest)")
    return scan


def calibrate_catalog(
    directory: str | Path, images: str | Path, target_fmr: float = 0.01,
    unknown_classes: float | None = None, seed: int = 0, split: str | None = None,
    progress: Progress | None = None, **embed_options,
) -> Catalog:
    """Choose and record the threshold for ``target_fmr`` on new photos
    (``retrieval.openset.calibrated_threshold``), with the FMR, FNMR and Recall@1 it gives on
    these. The unknown photos are those of classes the catalogue lacks, and with
    ``unknown_classes`` also a seeded share of the catalogue's classes held out of the search.
    Returns the calibrated catalogue."""
    store = store_of(directory)
    catalog = store.read()
    scan = labelled_photos(catalog, images, split)
    vectors, indices = CatalogSearcher(catalog).embed(scan.paths, progress, **embed_options)
    if len(indices) == 0:
        raise DataError(f"no readable images in {images}")
    labels, names, unknown = _query_labels(catalog, scan.classes, scan.labels[indices])
    if unknown_classes is not None:
        known_present = np.setdiff1d(labels, unknown)
        if len(known_present) >= 2:
            unknown = np.union1d(unknown, held_out_classes(known_present, unknown_classes, seed))
    if not np.isin(labels, unknown).any():
        raise DataError("calibration needs photos of items the catalogue lacks: give images "
                        "of other classes too, or {unknown_classes}", options=("unknown_classes",))
    measured = measure(vectors, labels, catalog.vectors, catalog.labels, unknown, names,
                       target_fmr)
    calibration = calibration_record(measured, images, len(catalog), _warnings(
        measured.report, catalog, [scan.paths[i] for i in indices], ~np.isin(labels, unknown)))
    return store.calibrate(catalog, calibration, change(
        "calibrate", local_user(), len(indices), 0, threshold=calibration["threshold"]))


def calibration_record(measured: Measured, images: str | Path, items: int,
                       warnings: list[str]) -> dict:
    """What catalog.json keeps of a calibration."""
    return {**measured.report.to_dict(), **measured.figures, "images": str(images),
            "items": items, "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "warnings": warnings}
