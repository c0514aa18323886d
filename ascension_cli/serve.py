"""`ascension serve`: a catalogue as an HTTP lookup service (FastAPI on uvicorn, the ``serve``
extra, which this module needs), loaded once. Requests that arrive together are embedded as one
batch.

Uploaded images go through the very pipeline of ``ascension search`` (written to a private
temporary folder, then ``CatalogSearcher.embed``), so a photo gets the same answer either way.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile  # what form() gives (FastAPI's subclasses it)

from ascension_cli.atomic import atomic_write
from ascension_cli.catalog import CatalogSearcher, load_catalog
from ascension_cli.data.folder import ImageDecodeError, decode_image
from ascension_cli.paths import CATALOG_JSON, CATALOG_VERSION
from ascension_cli.retrieval.report import thumbnail


@dataclass
class _Pending:
    """One request's images, waiting for the next batch."""

    images: list[tuple[str, bytes]]
    k: int
    threshold: float | None
    queued: float = field(default_factory=time.perf_counter)
    done: asyncio.Future | None = None


class Lookup:
    """The catalogue, its model and index, loaded once and re-read when the folder changes."""

    def __init__(self, directory: Path, run_options: dict[str, Any], max_pixels: int):
        self.directory = directory
        self.run_options = run_options
        self.max_pixels = max_pixels
        self.lock = threading.Lock()
        self._load()

    def _stamp(self) -> tuple[int, int]:
        stat = (self.directory / CATALOG_JSON).stat()
        return stat.st_mtime_ns, stat.st_size

    def _load(self) -> None:
        stamp = self._stamp()
        self.searcher = CatalogSearcher(load_catalog(self.directory, with_vectors=False))
        self.stamp = stamp

    def _refresh(self) -> CatalogSearcher:
        if self._stamp() != self.stamp:
            self._load()
        return self.searcher

    def current(self) -> CatalogSearcher:
        """The searcher, re-read first when catalog.json (written last by an add) changed."""
        with self.lock:
            return self._refresh()

    def add(self, images: list[tuple[str, bytes]], class_name: str) -> int:
        """Keep the images under CATALOG/uploads/CLASS and add them as items of that class.
        One writer at a time; searches see the old catalogue until the new one is written."""
        with self.lock:
            folder = self.directory / "uploads" / class_name
            folder.mkdir(parents=True, exist_ok=True)
            paths = []
            for name, data in images:
                path = folder / f"{uuid.uuid4().hex}{Path(name).suffix.lower() or '.img'}"
                atomic_write(path, lambda handle, data=data: handle.write(data))
                paths.append(path)
            # Added to the catalogue as it is on disk now (another process may have grown it).
            added = self._refresh().add(paths, class_name, **self.run_options)
            self._load()
        return added

    def check_image(self, name: str, data: bytes) -> None:
        """Refuse what is not an image, or is a bomb, before it is queued."""
        decode_image(data, name, self.max_pixels)

    def search(self, batch: list[_Pending]) -> list[list[dict]]:
        """Embed every image of the batch at once, then match each request on its own terms."""
        searcher = self.current()
        with tempfile.TemporaryDirectory(prefix="ascension-serve-") as folder:
            paths, owners = [], []
            for number, pending in enumerate(batch):
                for position, (name, data) in enumerate(pending.images):
                    path = Path(folder) / f"{number}-{position}{Path(name).suffix or '.img'}"
                    path.write_bytes(data)
                    paths.append(path)
                    owners.append((number, name))
            vectors, indices = searcher.embed(paths, **self.run_options)
        answers: list[list[dict]] = [[] for _ in batch]
        for number, pending in enumerate(batch):
            rows = [row for row, i in enumerate(indices) if owners[i][0] == number]
            names = [owners[indices[row]][1] for row in rows]
            results = searcher.match(vectors[rows], names, pending.k, pending.threshold)
            answers[number] = [result.to_dict() for result in results]
        return answers


class Batcher:
    """Collects requests for up to ``window`` seconds (or ``max_images``), then runs one batch in
    a worker thread; each request's future gets its own results."""

    def __init__(self, lookup: Lookup, window: float, max_images: int):
        self.lookup, self.window, self.max_images = lookup, window, max_images
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def submit(self, pending: _Pending) -> tuple[list[dict], float]:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
        pending.done = asyncio.get_running_loop().create_future()
        await self.queue.put(pending)
        results, started = await pending.done
        return results, started - pending.queued

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.perf_counter() + self.window
            while sum(len(p.images) for p in batch) < self.max_images:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            started = time.perf_counter()
            try:
                answers = await asyncio.to_thread(self.lookup.search, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear of it
                for pending in batch:
                    pending.done.set_exception(exc)
                continue
            for pending, results in zip(batch, answers, strict=True):
                pending.done.set_result((results, started))


__all__ = ["Batcher", "ImageDecodeError", "Lookup"]


SETTINGS_VARIABLE = "ASCENSION_SERVE_SETTINGS"


def _search_options(form: Any) -> tuple[int, float | None]:
    """``k`` and ``threshold`` of a search form; ValueError says what is wrong with them."""
    try:
        k = int(form.get("k") or 5)
        threshold = (None if form.get("threshold") in (None, "")
                     else float(form.get("threshold")))
    except ValueError:
        raise ValueError("k must be a whole number and threshold a number") from None
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be from 1 to 1000 (got {k})")
    if threshold is not None and not -1 <= threshold <= 1:
        raise ValueError(f"threshold must be from -1 to 1 (got {threshold})")
    return k, threshold


def _search_problem(form: Any) -> str | None:
    try:
        _search_options(form)
    except ValueError as exc:
        return str(exc)
    return None


def _label_problem(form: Any) -> str | None:
    label = str(form.get("label") or "")
    if not label or label.startswith(".") or any(c in label for c in "/\\\0") or len(label) > 100:
        return "label must be a class name (no slashes, not hidden, at most 100 characters)"
    return None


def app_from_environment() -> FastAPI:
    """The app each process of ``serve --workers N`` builds (uvicorn calls this factory)."""
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    return create_app(Path(settings.pop("catalog")), **settings)


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_images(
    request: Request, lookup: Lookup, max_upload_bytes: int,
    check: Callable[[Any], str | None],
) -> tuple[Any, list[tuple[str, bytes]] | Response]:
    """The form and its checked images, or the 4xx response saying what is wrong (the form's
    other fields are ``check``ed before the images are decoded)."""
    size = int(request.headers.get("content-length") or 0)
    if size > max_upload_bytes:
        return None, _problem(413, f"upload of {size} bytes is over the limit of "
                                   f"{max_upload_bytes} (--max-upload-mb)")
    form = await request.form()
    message = check(form)
    if message is not None:
        return form, _problem(400, message)
    uploads = [item for item in form.getlist("image") if isinstance(item, UploadFile)]
    if not uploads:
        return form, _problem(400, "no image: send one or more files in the multipart field "
                                   "'image'")
    images = []
    for upload in uploads:
        data = await upload.read()
        name = upload.filename or "upload"
        try:
            lookup.check_image(name, data)
        except ImageDecodeError as exc:
            return form, _problem(400, str(exc))
        images.append((name, data))
    return form, images


def _reading_routes(app: FastAPI, lookup: Lookup) -> None:
    """The page, the catalogue's facts and its thumbnails."""

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict:
        found = lookup.current().catalog
        return {"model": found.spec.name, "feature_kind": found.feature_kind,
                "dimension": found.dim, "index": found.index_kind, "items": len(found),
                "classes": len(found.class_names), "catalog": str(found.directory),
                "catalog_version": CATALOG_VERSION}

    @app.get("/items/{item}/image")
    def item_image(item: int) -> Response:
        import cv2

        found = lookup.current().catalog
        if not 0 <= item < len(found):
            return _problem(404, f"no item {item}: the catalogue holds {len(found)}")
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(thumbnail(Path(found.paths[item]), 256),
                                                     cv2.COLOR_RGB2BGR))
        return Response(data.tobytes(), media_type="image/jpeg")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # none, rather than a 404 in every browser console

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        from ascension_cli.serve_page import PAGE

        return PAGE


def create_app(catalog: Path, run_options: dict[str, Any], max_pixels: int,
               max_upload_bytes: int, batch_window: float = 0.005, max_batch: int = 32,
               token: str | None = None) -> FastAPI:
    """The FastAPI application serving one catalogue; ``token`` None keeps writes off."""
    lookup = Lookup(catalog, run_options, max_pixels)
    batcher = Batcher(lookup, batch_window, max_batch)
    app = FastAPI(title="Ascension lookup", docs_url="/docs", redoc_url=None)
    _reading_routes(app, lookup)

    @app.post("/search")
    async def search(request: Request) -> Response:
        form, images = await _read_images(request, lookup, max_upload_bytes, _search_problem)
        if isinstance(images, Response):
            return images
        k, threshold = _search_options(form)
        results, waited = await batcher.submit(_Pending(images, k, threshold))
        return JSONResponse({"k": k, "threshold": threshold, "waited_ms": waited * 1000,
                             "results": results})

    @app.post("/items")
    async def add_items(request: Request) -> Response:
        if token is None:
            return _problem(403, "writes are off: start the service with --allow-writes and "
                                 "--token")
        if not secrets.compare_digest(request.headers.get("authorization", ""),
                                      f"Bearer {token}"):
            return _problem(401, "a wrong or missing token (Authorization: Bearer TOKEN)")
        form, images = await _read_images(request, lookup, max_upload_bytes, _label_problem)
        if isinstance(images, Response):
            return images
        added = await asyncio.to_thread(lookup.add, images, str(form.get("label")))
        return JSONResponse({"added": added, "items": len(lookup.current().catalog)})

    return app
