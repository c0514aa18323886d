"""What a change to a catalogue should warn about: for each item just added, its nearest item
of another class, and whether the two are confusable (as similar as the catalogue's calibrated
threshold, or ``CONFUSABLE_SIMILARITY`` without one): a search may take one for the other."""

from __future__ import annotations

import numpy as np

from ascension_cli.catalog.store import Catalog, load_index
from ascension_cli.retrieval.index import search

CONFUSABLE_SIMILARITY = 0.9  # without a calibration: closer than this is confusable
DEPTH = 64  # neighbours looked through for one of another class


def nearest_other_class(catalog: Catalog, first_new_row: int,
                        threshold: float | None = None) -> list[dict]:
    """For each item among the photos from ``first_new_row`` on: its nearest photo of another
    class (of any item), the similarity, and whether that is confusable. Most similar first;
    an item whose first ``DEPTH`` neighbours are all of its own class is left out."""
    rows = np.arange(first_new_row, len(catalog))
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
    limit = CONFUSABLE_SIMILARITY if threshold is None else threshold
    for entry in nearest.values():
        entry["confusable"] = entry["similarity"] >= limit
    return sorted(nearest.values(), key=lambda entry: -entry["similarity"])
