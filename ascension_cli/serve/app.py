"""`ascension serve`: a catalogue as an HTTP lookup service (FastAPI on uvicorn, the ``serve``
extra, which this module needs), loaded once. Requests that arrive together are embedded as one
batch.

Each uploaded image is decoded once, in memory, under the service's own ``--max-image-pixels``
(``Lookup.check_images``), then goes through the transform and forward pass of ``ascension
search`` (``embedding.pipeline.embed_decoded``), so a photo gets the same answer either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ascension_cli.catalog.history import summary
from ascension_cli.catalog_layout import CATALOG_VERSION, is_milvus
from ascension_cli.errors import CatalogError
from ascension_cli.retrieval.report import thumbnail
from ascension_cli.serve.batching import Batcher, Pending
from ascension_cli.serve.changes import writing_routes
from ascension_cli.serve.forms import (
    failure,
    problem,
    read_images,
    search_options,
    search_problem,
    unreadable,
)
from ascension_cli.serve.lookup import Lookup
from ascension_cli.serve.schemas import (
    ERRORS,
    ErrorAnswer,
    HistoryAnswer,
    InfoAnswer,
    SearchAnswer,
    SearchForm,
    form_body,
)

SETTINGS_VARIABLE = "ASCENSION_SERVE_SETTINGS"


def app_from_environment() -> FastAPI:
    """The app each process of ``serve --workers N`` builds (uvicorn calls this factory)."""
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    catalog = settings.pop("catalog")
    return create_app(catalog if is_milvus(catalog) else Path(catalog), **settings)


def _reading_routes(app: FastAPI, lookup: Lookup) -> None:
    """The page, the catalogue's facts and its thumbnails."""

    @app.get("/healthz")
    async def healthz() -> dict:  # on the event loop itself: it answers while workers are busy
        return {"status": "ok"}

    @app.get("/info", response_model=InfoAnswer, responses={503: ERRORS[503]})
    def info() -> dict:
        found = lookup.current().catalog
        return {"model": found.spec.name, "feature_kind": found.feature_kind,
                "dimension": found.dim, "index": found.index_kind, "items": len(found),
                "classes": len(found.class_names), "catalog": lookup.name,
                "catalog_version": CATALOG_VERSION, "calibration": found.calibration,
                "calibration_note": found.calibration_note(),
                "history": summary(lookup.store.history())}

    @app.get("/items/{item}/image", response_class=Response, responses={
        200: {"content": {"image/jpeg": {}}, "description": "A 256-pixel thumbnail."},
        404: {"model": ErrorAnswer}, 503: ERRORS[503]})
    def item_image(item: int) -> Response:
        import cv2

        found = lookup.current().catalog
        if not 0 <= item < len(found):
            return problem(404, f"no item {item}: the catalogue holds {len(found)}")
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(thumbnail(found.photo_file(item), 256),
                                                     cv2.COLOR_RGB2BGR))
        return Response(data.tobytes(), media_type="image/jpeg")

    @app.get("/history", response_model=HistoryAnswer, responses={503: ERRORS[503]})
    def history(last: int = Query(100, ge=1, le=10_000)) -> dict:
        return summary(lookup.store.history(), last)

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # none, rather than a 404 in every browser console

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        from ascension_cli.serve.page import PAGE

        return PAGE


def create_app(catalog: Path | str, run_options: dict[str, Any], max_pixels: int,
               max_upload_bytes: int, batch_window: float = 0.005, max_batch: int = 32,
               token: str | None = None, token_name: str = "default") -> FastAPI:
    """The FastAPI application serving one catalogue; ``token`` None keeps writes off, and
    the history records writes as ``token:TOKEN_NAME``."""
    lookup = Lookup(catalog, run_options, max_pixels)
    batcher = Batcher(lookup, batch_window, max_batch)
    app = FastAPI(title="Ascension lookup", docs_url="/docs", redoc_url=None)
    # Every route that reads the catalogue answers 503 while it cannot be read, never a 500.
    app.add_exception_handler(CatalogError, lambda _request, exc: unreadable(exc))
    _reading_routes(app, lookup)

    @app.post("/search", response_model=SearchAnswer, responses=ERRORS,
              openapi_extra=form_body(SearchForm))
    async def search(request: Request) -> Response:
        form, images = await read_images(request, lookup, max_upload_bytes, search_problem)
        if isinstance(images, Response):
            return images
        k, threshold, group_by = search_options(form)
        pending = Pending(images, k, threshold, group_by)
        try:
            results, waited = await batcher.submit(pending)
        except Exception as exc:  # noqa: BLE001 - a JSON answer, never a traceback
            return failure(exc)
        return JSONResponse({"k": k, "threshold": pending.applied, "group_by": group_by,
                             "waited_ms": waited * 1000,
                             "results": results})

    writing_routes(app, lookup, token, token_name, max_upload_bytes)
    return app
