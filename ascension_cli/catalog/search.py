"""Searching a catalogue: top-k items per query photo and a similarity-weighted class vote;
``CatalogSearcher`` keeps the model and index loaded for many searches (``serve``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ascension_cli.catalog.store import (
    Catalog,
    append_items,
    load_catalog_model,
    load_index,
    write_catalog,
)
from ascension_cli.embedding.pipeline import embed_images
from ascension_cli.errors import CatalogError
from ascension_cli.progress import Progress
from ascension_cli.retrieval.index import search


@dataclass
class Match:
    path: str
    class_name: str | None
    similarity: float
    id: int = -1  # the item's row in the catalogue


@dataclass
class SearchResult:
    query: str
    matches: list[Match] = field(default_factory=list)
    predicted: str | None = None  # None: unknown (nothing close enough) or no labelled match
    score: float = 0.0  # the predicted class's share of the similarity-weighted vote
    unknown: bool = False

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "predicted": self.predicted,
            "score": self.score,
            "unknown": self.unknown,
            "matches": [
                {"id": m.id, "path": m.path, "class": m.class_name, "similarity": m.similarity}
                for m in self.matches
            ],
        }


def vote(matches: list[Match]) -> tuple[str | None, float]:
    """Similarity-weighted vote over the labelled matches: (class, its share of the vote)."""
    weights: dict[str, float] = {}
    for match in matches:
        if match.class_name is not None:
            weights[match.class_name] = weights.get(match.class_name, 0.0) + max(
                match.similarity, 0.0)
    total = sum(weights.values())
    if not weights or total <= 0:
        return None, 0.0
    best = max(weights, key=weights.get)
    return best, weights[best] / total


class CatalogSearcher:
    """A catalogue with its model and index loaded once, for many searches (``serve``)."""

    def __init__(self, catalog: Catalog):
        if len(catalog) == 0:
            raise CatalogError(f"the catalogue in {catalog.directory} is empty")
        self.catalog = catalog
        self.model = load_catalog_model(catalog)
        self.index = load_index(catalog)

    def embed(self, query_paths: list[Path], progress: Progress | None = None,
              **embed_options) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, indices into ``query_paths``) of the readable query images."""
        vectors, _, indices = embed_images(
            self.model, self.catalog.spec, query_paths, None, progress,
            feature_kind=self.catalog.feature_kind, **embed_options)
        return vectors, indices

    def add(self, paths: list[Path], class_name: str, **embed_options) -> int:
        """Embed the images at ``paths`` as items of ``class_name`` and write the catalogue;
        how many were readable. Searches meanwhile use the catalogue as it was. The caller
        holds ``catalog_lock`` and has read the catalogue under it."""
        vectors, indices = self.embed(paths, **embed_options)
        write_catalog(append_items(self.catalog, vectors, [class_name] * len(indices),
                                   [paths[i] for i in indices], classes=[class_name]), None)
        return len(indices)

    def match(self, vectors: np.ndarray, names: list[str], k: int = 5,
              threshold: float | None = None) -> list[SearchResult]:
        """Top-``k`` items and the voted class of each vector (``names[i]`` its query).

        A query whose best match is less similar than ``threshold`` is marked unknown.
        """
        if len(vectors) == 0:
            return []
        catalog = self.catalog
        ids, scores = search(self.index, vectors, k)
        results = []
        for row, name in enumerate(names):
            matches = [
                Match(catalog.paths[i], catalog.class_name(int(catalog.labels[i])), float(score),
                      int(i))
                for i, score in zip(ids[row], scores[row], strict=True) if i >= 0
            ]
            result = SearchResult(name, matches)
            if threshold is not None and (not matches or matches[0].similarity < threshold):
                result.unknown = True
            else:
                result.predicted, result.score = vote(matches)
            results.append(result)
        return results


def search_catalog(
    catalog: Catalog,
    query_paths: list[Path],
    k: int = 5,
    threshold: float | None = None,
    progress: Progress | None = None,
    **embed_options,
) -> list[SearchResult]:
    """Top-``k`` catalogue items per readable query image, with a voted class."""
    searcher = CatalogSearcher(catalog)
    vectors, indices = searcher.embed(query_paths, progress, **embed_options)
    return searcher.match(vectors, [str(query_paths[i]) for i in indices], k, threshold)
