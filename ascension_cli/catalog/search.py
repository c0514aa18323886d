"""Searching a catalogue: top-k items per query photo and a similarity-weighted class vote;
``CatalogSearcher`` keeps the model and index loaded for many searches (``serve``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ascension_cli.catalog.store import Catalog, load_catalog_model, load_index
from ascension_cli.embedding.pipeline import (
    EmbedOptions,
    decode_side,
    embed_decoded,
    embed_images,
)
from ascension_cli.errors import CatalogError
from ascension_cli.progress import Progress
from ascension_cli.retrieval.index import search


@dataclass
class Match:
    path: str
    class_name: str | None
    similarity: float
    id: int = -1  # the photo's row in the catalogue
    item: str | None = None  # the item (product, SKU) the photo shows


@dataclass
class SearchResult:
    query: str
    matches: list[Match] = field(default_factory=list)
    predicted: str | None = None  # None: unknown (nothing close enough) or no labelled match
    score: float = 0.0  # the predicted class's share of the similarity-weighted vote
    unknown: bool = False
    item: str | None = None  # the best match's item, unless unknown

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "predicted": self.predicted,
            "score": self.score,
            "unknown": self.unknown,
            "item": self.item,
            "matches": [
                {"id": m.id, "item": m.item, "path": m.path, "class": m.class_name,
                 "similarity": m.similarity}
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
    """A catalogue with its model and index loaded once, for many searches (``serve``).

    Threads share it: a service's search batches and its adds embed with the same model. Each
    embedding sets the model's device, memory layout and mode before its forward pass, and a
    pass that overlapped another thread's computed wrong vectors (about 1 call in 300 under
    four threads, none once the model was set up before any thread used it), so the model
    embeds one batch at a time.
    """

    def __init__(self, catalog: Catalog):
        if len(catalog) == 0:
            raise CatalogError(f"the catalogue in {catalog.directory} is empty")
        self.catalog = catalog
        self.model = load_catalog_model(catalog)
        self.index = load_index(catalog)
        self.items = catalog.items()
        self._embedding = threading.Lock()

    def embed(self, query_paths: list[Path], progress: Progress | None = None,
              **embed_options) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, indices into ``query_paths``) of the readable query images."""
        with self._embedding:
            vectors, _, indices = embed_images(
                self.model, self.catalog.spec, query_paths, None, progress,
                feature_kind=self.catalog.feature_kind, **embed_options)
        return vectors, indices

    def embed_decoded(self, images: list[np.ndarray],
                      **embed_options) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, indices) of images decoded already (``embedding.pipeline.embed_decoded``)."""
        with self._embedding:
            return embed_decoded(self.model, self.catalog.spec, images,
                                 feature_kind=self.catalog.feature_kind, **embed_options)

    def decode_side(self, **embed_options) -> int:
        """The short side to decode a query down to, as ``embed`` would."""
        return decode_side(self.catalog.spec, EmbedOptions.of(**embed_options))

    def match(self, vectors: np.ndarray, names: list[str], k: int = 5,
              threshold: float | None = None, group_by: str = "photo") -> list[SearchResult]:
        """Top-``k`` photos (``group_by="item"``: distinct items, each by its best photo) and
        the voted class of each vector (``names[i]`` its query).

        A query whose best match is less similar than ``threshold`` is marked unknown.
        """
        if len(vectors) == 0:
            return []
        rows = self._nearest(vectors, k, group_by)
        results = []
        for row, name in enumerate(names):
            matches = rows[row]
            result = SearchResult(name, matches, item=matches[0].item if matches else None)
            if threshold is not None and (not matches or matches[0].similarity < threshold):
                result.unknown, result.item = True, None
            else:
                result.predicted, result.score = vote(matches)
            results.append(result)
        return results

    def _nearest(self, vectors: np.ndarray, k: int, group_by: str) -> list[list[Match]]:
        """Each query's top ``k`` photos, or with ``group_by="item"`` its top ``k`` distinct
        items (searching deeper until ``k`` are found or the catalogue is exhausted)."""
        catalog, items = self.catalog, self.items
        depth = k if group_by == "photo" else min(len(catalog), 8 * k)
        while True:
            ids, scores = search(self.index, vectors, depth)
            found = [_matches(catalog, items, ids[row], scores[row], k, group_by)
                     for row in range(len(vectors))]
            if depth >= len(catalog) or all(len(m) >= k for m in found):
                return found
            depth = min(len(catalog), depth * 4)


def _matches(catalog: Catalog, items: list[str], ids: np.ndarray, scores: np.ndarray, k: int,
             group_by: str) -> list[Match]:
    """Matches from one query's neighbours (best first): all of them, or each item's first."""
    matches, seen = [], set()
    for i, score in zip(ids, scores, strict=True):
        if i < 0 or (group_by == "item" and items[i] in seen):
            continue
        seen.add(items[i])
        matches.append(Match(catalog.paths[i], catalog.class_name(int(catalog.labels[i])),
                             float(score), int(i), items[i]))
        if len(matches) == k:
            break
    return matches


def search_catalog(
    catalog: Catalog,
    query_paths: list[Path],
    k: int = 5,
    threshold: float | None = None,
    progress: Progress | None = None,
    group_by: str = "photo",
    **embed_options,
) -> list[SearchResult]:
    """Top-``k`` catalogue photos (or distinct items) per readable query image, with a voted
    class."""
    searcher = CatalogSearcher(catalog)
    vectors, indices = searcher.embed(query_paths, progress, **embed_options)
    return searcher.match(vectors, [str(query_paths[i]) for i in indices], k, threshold,
                          group_by)
