"""What a catalogue should warn about. For each item just added: its nearest item of another
class, and whether the two are confusable (as similar as the catalogue's calibrated threshold,
or ``CONFUSABLE_SIMILARITY`` without one): a search may take one for the other. For a whole
catalogue (``index --check``): its confusable item pairs, near-duplicate photos filed under two
classes, and photos whose nearest neighbours all agree on another class (``retrieval.cleaning``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ascension_cli.catalog.store import Catalog, load_index
from ascension_cli.progress import Progress
from ascension_cli.retrieval.cleaning import (
    NEIGHBOURS,
    ItemPair,
    PhotoPair,
    SuspectedLabel,
    confusable_items,
    cross_class_duplicates,
    suspected_label_errors,
)
from ascension_cli.retrieval.index import drop_self, search

CONFUSABLE_SIMILARITY = 0.9  # without a calibration: closer than this is confusable
DEPTH = 64  # neighbours looked through for one of another class


def confusable_limit(catalog: Catalog) -> float:
    """The similarity from which two items of different classes are confusable: the
    catalogue's calibrated threshold, else ``CONFUSABLE_SIMILARITY``."""
    return CONFUSABLE_SIMILARITY if catalog.threshold is None else catalog.threshold


def nearest_other_class(catalog: Catalog, rows: int | np.ndarray) -> list[dict]:
    """For each item among the photos at ``rows`` (a number: the rows from it on, those an add
    appended): its nearest photo of another class (of any item), the similarity, and whether
    that is confusable (``confusable_limit``). Most similar first; an item whose first
    ``DEPTH`` neighbours are all of its own class is left out."""
    if isinstance(rows, int):
        rows = np.arange(rows, len(catalog))
    if not len(rows) or len(catalog) < 2:
        return []
    items = catalog.items()
    vectors = catalog.with_vectors().vectors[rows]
    ids, scores = search(load_index(catalog), vectors, min(len(catalog), DEPTH))
    nearest: dict[str, dict] = {}
    for position, row in enumerate(rows):
        own = int(catalog.labels[row])
        for other, similarity in zip(ids[position], scores[position], strict=True):
            if other < 0 or int(catalog.labels[other]) == own or items[other] == items[row]:
                continue
            found = nearest.get(items[row])
            if found is None or similarity > found["similarity"]:
                nearest[items[row]] = {
                    "item": items[row], "class": catalog.class_name(own),
                    "nearest_item": items[other],
                    "nearest_class": catalog.class_name(int(catalog.labels[other])),
                    "similarity": float(similarity)}
            break
    limit = confusable_limit(catalog)
    for entry in nearest.values():
        entry["confusable"] = entry["similarity"] >= limit
    return sorted(nearest.values(), key=lambda entry: -entry["similarity"])


def confusable_of(onboarding: list[dict]) -> list[dict]:
    """The entries of ``nearest_other_class`` flagged confusable, in its order."""
    return [entry for entry in onboarding if entry["confusable"]]


@dataclass(frozen=True)
class CatalogCheck:
    """What ``index --check`` found in a whole catalogue, most serious first in each list."""

    catalog: Catalog
    threshold: float  # the similarity from which two items are confusable
    confusable: list[ItemPair]
    duplicates: list[PhotoPair]
    suspected: list[SuspectedLabel]

    def to_dict(self) -> dict:
        catalog = self.catalog

        def photo(row: int) -> dict:
            return {"path": catalog.paths[row], "item": catalog.item(row),
                    "class": catalog.class_name(int(catalog.labels[row]))}

        return {
            "items": len(catalog), "threshold": self.threshold,
            "calibrated": catalog.threshold is not None,
            "confusable_items": [
                {"item": pair.first, "other_item": pair.second, "similarity": pair.similarity,
                 "photo": photo(pair.first_row), "other_photo": photo(pair.second_row)}
                for pair in self.confusable],
            "cross_class_duplicates": [
                {"similarity": pair.similarity, "photo": photo(pair.first),
                 "other_photo": photo(pair.second)} for pair in self.duplicates],
            "suspected_label_errors": [
                {**photo(entry.row), "suggested_class": catalog.class_name(entry.suggested),
                 "margin": entry.margin, "own_class_rank": entry.own_rank}
                for entry in self.suspected],
        }


def check_catalog(catalog: Catalog, progress: Progress | None = None) -> CatalogCheck:
    """Search every photo of ``catalog`` among the others (through its own index, so a large
    catalogue is checked as fast as it is searched) and list what to clean."""
    catalog = catalog.with_vectors()
    threshold = confusable_limit(catalog)
    if len(catalog) < 2:
        return CatalogCheck(catalog, threshold, [], [], [])
    progress = progress or Progress()
    progress.start(len(catalog))
    depth = min(len(catalog) - 1, NEIGHBOURS)
    ids, scores = search(load_index(catalog), catalog.vectors, depth + 1,
                         on_progress=progress.advance)
    ids, scores = drop_self(ids, scores, depth)
    labels = catalog.labels
    return CatalogCheck(catalog, threshold,
                        confusable_items(ids, scores, labels, catalog.items(), threshold),
                        cross_class_duplicates(ids, scores, labels),
                        suspected_label_errors(ids, scores, labels))
