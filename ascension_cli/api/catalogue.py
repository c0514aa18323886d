"""Catalogues from Python, as ``ascension index``, ``search`` and ``serve`` do them (the
command line calls ``run_index``, ``run_search`` and ``run_serve``)."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascension_cli.config import CalibrateConfig, IndexConfig, SearchConfig, ServeConfig, resolve
from ascension_cli.errors import AscensionError, DataError

if TYPE_CHECKING:
    from ascension_cli.catalog.check import CatalogCheck
    from ascension_cli.catalog.search import SearchResult
    from ascension_cli.catalog.store import Catalog
    from ascension_cli.progress import Progress


@dataclass
class IndexResult:
    catalog: Catalog
    added: int  # images added by this call
    # With add: each new item's nearest item of another class, and whether they are confusable
    # (``catalog.check.nearest_other_class``).
    onboarding: list[dict] = field(default_factory=list)
    check: CatalogCheck | None = None  # with ``check``: what to clean in the whole catalogue

    def to_dict(self) -> dict:
        """What ``index --json`` writes."""
        data = {"catalog": str(self.catalog.directory), "items": len(self.catalog),
                "classes": len(self.catalog.class_names), "added": self.added,
                "onboarding": self.onboarding}
        if self.check is not None:
            data["check"] = self.check.to_dict()
        return data

    @property
    def confusable(self) -> list[dict]:
        """The new items flagged confusable (``onboarding``'s), most similar first."""
        from ascension_cli.catalog.check import confusable_of

        return confusable_of(self.onboarding)

    @property
    def confusable_limit(self) -> float:
        """The similarity from which they are (``catalog.check.confusable_limit``)."""
        from ascension_cli.catalog.check import confusable_limit

        return confusable_limit(self.catalog)

    def index_description(self) -> str | None:
        """The index the catalogue was given: its shape, memory and measured recall."""
        from ascension_cli.retrieval.index import IndexPlan

        info = self.catalog.index
        if "count" not in info:
            return None
        fields = {key: info[key] for key in ("kind", "count", "dim", "lists", "probes",
                                             "code_bytes", "train_size")}
        line = f"index: {IndexPlan(**fields).describe()}"
        if "recall_at_10_vs_exact" in info:
            which = ("held-out items" if info.get("recall_sample_held_out")
                     else "items, all in the training sample")
            line += (f"; recall@10 against exact search {info['recall_at_10_vs_exact']:.3f} "
                     f"(on {info['recall_sample']:,} {which})")
        return line


def run_index(settings: IndexConfig, progress: Progress | None = None) -> IndexResult:
    """Build the catalogue (or add to it, with ``settings.add``), then check it with
    ``settings.check``; write the JSON ``settings.json_file`` names."""
    from ascension_cli.catalog.build import build_catalog
    from ascension_cli.catalog.check import check_catalog, nearest_other_class
    from ascension_cli.catalog.store import load_catalog
    from ascension_cli.progress import Progress

    progress = progress or Progress()
    if settings.builds:
        catalog, added = build_catalog(
            settings.checkpoint, settings.gallery_root, settings.output, add=settings.add,
            feature_kind=settings.features, progress=progress, split=settings.split,
            index_kind=settings.kind, photos=settings.photos, shared=settings.shared,
            **settings.run_options())
    else:
        catalog, added = load_catalog(settings.output), 0
    onboarding = nearest_other_class(catalog, len(catalog) - added) if settings.add else []
    result = IndexResult(catalog, added, onboarding)
    if settings.check:
        result.check = check_catalog(catalog, progress.stage("checking"))
    if settings.json_file is not None:
        from ascension_cli.retrieval.report import write_json

        write_json(settings.json_file, result.to_dict())
    return result


def index(checkpoint: str | Path | None, gallery_root: str | Path | None, output: str | Path,
          progress: Progress | None = None, **options: Any) -> IndexResult:
    """Build a catalogue of ``gallery_root``'s images, as ``ascension index``; ``options``:
    add, check, kind, split, features, json_file, batch_size, precision, workers, device,
    channels_last. ``index(None, None, catalogue, check=True)`` checks one as it is."""
    given = dict(options, output=output)
    if checkpoint is not None or gallery_root is not None:
        given.update(checkpoint=checkpoint, gallery_root=gallery_root)
    return run_index(resolve(IndexConfig, given), progress)


def run_search(settings: SearchConfig, progress: Progress | None = None) -> list[SearchResult]:
    """Top-k matches and a voted class for each readable photo of ``settings.images``; with
    ``json_file`` the results are written there too."""
    from ascension_cli.catalog.search import search_catalog
    from ascension_cli.catalog.store import load_catalog
    from ascension_cli.data.folder import list_images
    from ascension_cli.progress import Progress
    from ascension_cli.retrieval.report import write_json

    catalog = load_catalog(settings.catalog, with_vectors=False)
    threshold = catalog.threshold_for(settings.threshold)
    note = catalog.calibration_note()
    results = search_catalog(catalog, list_images(settings.images), settings.k,
                             threshold, progress, settings.group_by,
                             **settings.run_options())
    if not results:
        raise DataError("no readable query image")
    if note is not None:
        (progress or Progress()).note(f"note: {note}")
    if settings.json_file is not None:
        write_json(settings.json_file, {"catalog": str(settings.catalog), "k": settings.k,
                                        "threshold": threshold,
                                        "group_by": settings.group_by,
                                        "results": [r.to_dict() for r in results]})
    return results


def run_calibrate(settings: CalibrateConfig, progress: Progress | None = None) -> Catalog:
    """Choose the catalogue's threshold for ``settings.target_fmr`` and record it."""
    from ascension_cli.catalog.calibrate import calibrate_catalog

    return calibrate_catalog(settings.catalog, settings.images, settings.target_fmr,
                             settings.unknown_classes, settings.seed, settings.split, progress,
                             **settings.run_options())


def calibrate(catalog: str | Path, images: str | Path, progress: Progress | None = None,
              **options: Any) -> Catalog:
    """Calibrate a catalogue's "not in the catalogue" threshold, as ``ascension calibrate``;
    ``options``: target_fmr, unknown_classes, seed, split, batch_size, precision, workers,
    device, channels_last. ``.calibration`` of the result holds what was measured."""
    return run_calibrate(resolve(CalibrateConfig, dict(options, catalog=catalog,
                                                        images=images)), progress)


def search(catalog: str | Path, images: str | Path | list, progress: Progress | None = None,
           **options: Any) -> list[SearchResult]:
    """Which catalogue item is each photo (files or folders), as ``ascension search``;
    ``options``: k, threshold, group_by ("photo" or "item"), json_file, batch_size, precision,
    workers, device, channels_last."""
    images = list(images) if isinstance(images, list | tuple) else [images]
    return run_search(resolve(SearchConfig, dict(options, catalog=catalog, images=images)),
                      progress)


def _require_serve_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "multipart")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise AscensionError(f"serve needs {', '.join(missing)}, which is not installed: "
                             'pip install "ascension-cli[serve]"')


def serve_app(settings: ServeConfig):
    """The FastAPI application ``ascension serve`` runs, for one process."""
    _require_serve_extra()
    from ascension_cli.serve.app import create_app

    return create_app(settings.catalog, **settings.app_options())


def run_serve(settings: ServeConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until stopped: one process, or ``settings.workers`` uvicorn processes that each
    build the app from the settings in the environment. ``on_ready`` is called once the serve
    extra is known to be installed, before the server starts."""
    _require_serve_extra()
    import uvicorn

    from ascension_cli.embedding.pipeline import settled_options

    settled_options(**settings.run_options())  # an unusable --device: one line, before serving
    if on_ready is not None:
        on_ready()
    from ascension_cli.serve.app import SETTINGS_VARIABLE

    if settings.workers == 1:
        uvicorn.run(serve_app(settings), host=settings.host, port=settings.port,
                    log_level="warning")
        return
    os.environ[SETTINGS_VARIABLE] = json.dumps(
        {"catalog": str(settings.catalog), **settings.app_options()})
    uvicorn.run("ascension_cli.serve.app:app_from_environment", factory=True,
                workers=settings.workers, host=settings.host, port=settings.port,
                log_level="warning")


def serve(catalog: str | Path, **options: Any) -> None:
    """Serve a catalogue over HTTP until stopped, as ``ascension serve``; ``options``: host,
    port, workers, allow_writes, token, batch_size, ... (``serve_app`` gives the app alone)."""
    run_serve(resolve(ServeConfig, dict(options, catalog=catalog)))
