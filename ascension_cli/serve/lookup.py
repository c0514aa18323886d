"""The catalogue a service answers from: loaded once, re-read when catalog.json changes, searched
a batch at a time, and added to under the catalogue's write lock. Each upload is decoded once,
in memory, under the service's own pixel limit, and embedded with the transform and forward
pass of ``ascension search`` (``CatalogSearcher.embed_decoded``): a photo gets the same answer
either way."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ascension_cli.catalog.folder_store import Changed, store_of
from ascension_cli.catalog.photos import remove_orphan_uploads
from ascension_cli.catalog.search import CatalogSearcher
from ascension_cli.catalog.store import catalog_lock, load_catalog
from ascension_cli.catalog_layout import UPLOADS_FOLDER, is_milvus
from ascension_cli.data.folder import decode_image
from ascension_cli.data.image_header import EXTENSIONS, image_format
from ascension_cli.embedding.pipeline import settled_options

if TYPE_CHECKING:  # the batcher hands its requests here; only a type, no import cycle
    from ascension_cli.serve.batching import Pending


@dataclass(frozen=True)
class Upload:
    """One uploaded photo: the client's name for it (only echoed back), its bytes (kept by an
    add) and the image decoded from them, once."""

    name: str
    data: bytes
    image: np.ndarray


class Lookup:
    """The catalogue, its model and index, loaded once and re-read when the folder changes."""

    def __init__(self, directory: Path | str, run_options: dict[str, Any], max_pixels: int):
        # a folder (as a Path, however it was given), or a Milvus location
        directory = directory if is_milvus(directory) else Path(directory)
        self.directory = directory
        self.store = store_of(directory)
        self.run_options = settled_options(**run_options)  # decided once, before any load
        self.max_pixels = max_pixels
        self.lock = threading.Lock()  # guards the searcher's swap, never held while embedding
        if is_milvus(directory) or not os.access(directory, os.W_OK):
            self._load()
            return
        with catalog_lock(directory):  # read under the lock: no add lands meanwhile
            self._load()
            # An add that a kill interrupted left these behind.
            removed = remove_orphan_uploads(directory, self.searcher.catalog.paths)
        if removed:
            print(f"removed {removed} photo(s) of an interrupted add from "
                  f"{directory / UPLOADS_FOLDER}", file=sys.stderr, flush=True)

    def _stamp(self):
        return self.store.stamp()

    @property
    def name(self) -> str:
        """What a client is told the catalogue is: its folder's name, or its collection."""
        if is_milvus(self.directory):
            return str(self.directory)
        return Path(self.directory).name

    def _load(self) -> None:
        stamp = self._stamp()
        try:
            searcher = CatalogSearcher(load_catalog(self.directory, with_vectors=False))
        except FileNotFoundError:  # a writer replaced the generation meanwhile: read again
            stamp = self._stamp()
            searcher = CatalogSearcher(load_catalog(self.directory, with_vectors=False))
        self.searcher, self.stamp = searcher, stamp
        ignored = searcher.catalog.calibration_ignored
        if ignored is not None:  # said once per change of catalog.json, where it is read
            print(f"warning: {searcher.catalog.calibration_note()}", file=sys.stderr, flush=True)

    def current(self) -> CatalogSearcher:
        """The searcher, re-read first when catalog.json (written last by a change) changed."""
        with self.lock:
            if self._stamp() != self.stamp:
                self._load()
            return self.searcher

    def add(self, images: list[Upload], class_name: str, by: str) -> Changed:
        """Keep the images in the catalogue and add them as photos of one item of that class
        (``FolderStore.add_decoded``: under the write lock, one writer at a time across
        processes; if the add fails, its photos go). Searches see the old catalogue until the
        new one is committed."""
        return self.change("add_decoded", [(upload.data, EXTENSIONS[image_format(upload.data)],
                                            upload.image) for upload in images], class_name, by,
                           searcher=self.current(), **self.run_options)

    def change(self, operation: str, *arguments, **options) -> Changed:
        """Run one of the store's changes (``FolderStore``'s method ``operation``), then read
        the catalogue again so the next search sees it."""
        changed = getattr(self.store, operation)(*arguments, **options)
        with self.lock:
            self._load()
        return changed

    def check_images(self, images: list[tuple[str, bytes]]) -> list[Upload]:
        """Each image decoded, once, under the service's own pixel limit (what is not an image,
        or is a bomb, is refused before it is queued): the search embeds these very arrays."""
        side = self.current().decode_side(**self.run_options)
        return [Upload(name, data, decode_image(data, printable(name), self.max_pixels, side))
                for name, data in images]

    def search(self, batch: list[Pending]) -> list[list[dict]]:
        """Embed every image of the batch at once (decoded already, by ``check_images``), then
        match each request on its own terms. The client's file names are only echoed back,
        never part of a path."""
        searcher = self.current()
        owners = [(number, upload.name) for number, pending in enumerate(batch)
                  for upload in pending.images]
        vectors, indices = searcher.embed_decoded(
            [upload.image for pending in batch for upload in pending.images], **self.run_options)
        answers: list[list[dict]] = [[] for _ in batch]
        for number, pending in enumerate(batch):
            rows = [row for row, i in enumerate(indices) if owners[i][0] == number]
            names = [owners[indices[row]][1] for row in rows]
            pending.applied = searcher.catalog.threshold_for(pending.threshold)
            results = searcher.match(vectors[rows], names, pending.k, pending.applied,
                                     pending.group_by)
            answers[number] = [_without_server_paths(result.to_dict()) for result in results]
        return answers


def _without_server_paths(result: dict) -> dict:
    """A search result as a client sees it: each match's file name, not where the server keeps
    it (``/items/ID/image`` serves the photo); an unlabelled photo's item, its path, likewise."""
    names = {match["path"]: Path(match["path"]).name for match in result["matches"]}
    for match in result["matches"]:
        match["item"] = names.get(match["item"], match["item"])
        match["path"] = names[match["path"]]
    result["item"] = names.get(result["item"], result["item"])
    return result


def printable(name: str) -> str:
    """A client's file name fit for an error message: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)[:120]
