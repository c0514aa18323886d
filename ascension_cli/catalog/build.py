"""Building a catalogue from a checkpoint and a gallery (a folder or manifest), or adding the
images it does not hold yet (``index --add``): embedded once the index they make is known to
fit, then written as a new generation under the writer lock."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ascension_cli.catalog.edit import append_items
from ascension_cli.catalog.folder_store import store_of
from ascension_cli.catalog.history import change, local_user
from ascension_cli.catalog.photos import keep_files
from ascension_cli.catalog.store import MILVUS_INDEX, Catalog
from ascension_cli.catalog_layout import SERVER_ONLY_KINDS
from ascension_cli.data.cache import available_memory
from ascension_cli.data.manifest import scan_any
from ascension_cli.embedding.pipeline import embed_images
from ascension_cli.embedding.vectors import sha256_of
from ascension_cli.errors import CatalogError, ConfigError, DataError
from ascension_cli.model.backbone import EmbeddingModel, ModelSpec
from ascension_cli.model.checkpoint import load_model
from ascension_cli.progress import Progress
from ascension_cli.retrieval.index import check_fits, plan_index


def build_catalog(
    checkpoint: str | Path,
    gallery_root: str | Path,
    directory: str | Path,
    add: bool = False,
    feature_kind: str = "backbone",
    progress: Progress | None = None,
    split: str | None = None,
    index_kind: str | None = None,
    photos: str = "copy",
    by: str | None = None,
    shared: str | Path | None = None,
    **embed_options,
) -> tuple[Catalog, int]:
    """Create a catalogue, or with ``add`` append the images it does not hold yet.

    Returns the catalogue and how many images were added. Labels come from class folders or a
    manifest (only ``split``'s rows when given; a flat folder gives -1); new class names are
    appended to the catalogue's list. ``index_kind`` (default: flat, or the catalogue's own with
    ``add``) is checked against the memory available before anything is embedded. ``photos``:
    ``copy`` keeps each photo inside the catalogue, ``reference`` only its path and digest
    (``catalog/photos.py``); ``by``: who, for the history (default: this machine's user).
    ``directory`` may be a Milvus location; a new one keeps its model and photos in
    ``shared``.
    ``embed_options`` are ``embed.pipeline.EmbedOptions``'.
    """
    model, spec, _ = load_model(checkpoint)
    store = store_of(directory, shared)
    with store.writing():
        catalog = _open_for_build(store, spec, sha256_of(checkpoint), feature_kind, add)
        if index_kind is not None:
            catalog = replace(catalog, index={"kind": index_kind})
        before = len(catalog)
        catalog = _append_new(store, catalog, scan_any(gallery_root, split), model, spec,
                              feature_kind, progress, embed_options, photos)
        if len(catalog) == 0:
            raise DataError(f"no readable images in {gallery_root}: the catalogue would be "
                            "empty")
        added = len(catalog) - before
        entry = change("add" if add else "build", by or local_user(), added,
                       len(set(catalog.items()[before:])), storage=photos)
        return store.commit(catalog, entry, model if not add else None), added


def _append_new(store, catalog: Catalog, scan, model: EmbeddingModel, spec: ModelSpec,
                feature_kind: str, progress: Progress | None, embed_options: dict,
                photos: str) -> Catalog:
    """``catalog`` with the images of ``scan`` it does not hold yet (and their classes), embedded
    once the index they make is known to fit the memory available, and kept as ``photos``
    says."""
    known = set(catalog.paths)
    fresh = [i for i, path in enumerate(scan.paths) if path.resolve().as_posix() not in known]
    _check_memory(len(catalog) + len(fresh), spec.feature_dim(feature_kind), catalog.index_kind)
    if not fresh:
        return catalog
    paths = [scan.paths[i] for i in fresh]
    vectors, _, indices = embed_images(model, spec, paths, None, progress,
                                       feature_kind=feature_kind, **embed_options)
    labels = scan.labels[fresh][indices]
    items = (None if scan.item_ids is None
             else [scan.item_ids[fresh[i]] for i in indices])  # a manifest's item_id column
    readable = [paths[i] for i in indices]
    store.begin(photos == "copy")
    return append_items(catalog, vectors, [scan.classes[label] if label >= 0 else None
                                           for label in labels],
                        readable, classes=scan.classes, item_ids=items,
                        kept=keep_files(catalog.directory, readable, photos))


def _open_for_build(
    store, spec: ModelSpec, checkpoint_sha: str, feature_kind: str, add: bool
) -> Catalog:
    """The catalogue to extend (same model and features required), or a new empty one."""
    directory = store.name
    if not add:
        if store.exists():
            raise CatalogError(f"{directory} already holds a catalogue: pass {{add}} to extend "
                               "it, or choose another {output}", options=("add", "output"))
        return Catalog(store.home(), spec, checkpoint_sha, feature_kind, [],
                       np.zeros((0, 0), np.float32), np.zeros(0, np.int64), [])
    catalog = store.read()
    if catalog.checkpoint_sha256 != checkpoint_sha:
        raise CatalogError(
            f"the catalogue in {directory} was built with another model (checkpoint sha256 "
            f"{catalog.checkpoint_sha256[:12]}…, this one {checkpoint_sha[:12]}…); "
            "its vectors would not be comparable"
        )
    if catalog.feature_kind != feature_kind:
        raise CatalogError(f"the catalogue holds {catalog.feature_kind} features, not "
                           f"{feature_kind}")
    return catalog


def _check_memory(count: int, dim: int, index_kind: str) -> None:
    """Refuse, before embedding, an index that would not fit the memory available."""
    if index_kind == MILVUS_INDEX or index_kind in SERVER_ONLY_KINDS:  # the server holds it
        return
    try:
        check_fits(plan_index(count, dim, index_kind), available_memory())
    except ConfigError as exc:
        raise CatalogError(exc.message, options=exc.options) from None
