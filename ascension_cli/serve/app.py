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
import sys
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
from ascension_cli.catalog.store import (
    CatalogError,
    CatalogSearcher,
    catalog_lock,
    load_catalog,
    remove_orphan_uploads,
)
from ascension_cli.data.folder import ImageDecodeError, decode_image
from ascension_cli.data.image_header import EXTENSIONS, image_format
from ascension_cli.errors import STORAGE_ERRNOS, first_line
from ascension_cli.paths import CATALOG_JSON, CATALOG_VERSION, UPLOADS_FOLDER
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
        self.lock = threading.Lock()  # guards the searcher's swap, never held while embedding
        if not os.access(directory, os.W_OK):
            self._load()
            return
        with catalog_lock(directory):  # read under the lock: no add lands meanwhile
            self._load()
            # An add that a kill interrupted left these behind.
            removed = remove_orphan_uploads(self.searcher.catalog)
        if removed:
            print(f"removed {removed} photo(s) of an interrupted add from "
                  f"{directory / UPLOADS_FOLDER}", file=sys.stderr, flush=True)

    def _stamp(self) -> tuple[int, int]:
        stat = (self.directory / CATALOG_JSON).stat()
        return stat.st_mtime_ns, stat.st_size

    def _load(self) -> None:
        stamp = self._stamp()
        try:
            searcher = CatalogSearcher(load_catalog(self.directory, with_vectors=False))
        except FileNotFoundError:  # a writer replaced the generation meanwhile: read again
            stamp = self._stamp()
            searcher = CatalogSearcher(load_catalog(self.directory, with_vectors=False))
        self.searcher, self.stamp = searcher, stamp

    def current(self) -> CatalogSearcher:
        """The searcher, re-read first when catalog.json (written last by a change) changed."""
        with self.lock:
            if self._stamp() != self.stamp:
                self._load()
            return self.searcher

    def add(self, images: list[tuple[str, bytes]], class_name: str) -> int:
        """Keep the images under CATALOG/uploads/CLASS and add them as items of that class,
        under the catalogue's write lock (one writer at a time, across processes). Searches see
        the old catalogue until the new one is committed; if the add fails, its photos go."""
        with catalog_lock(self.directory):
            searcher = self.current()  # the catalogue as it is on disk now, under the lock
            folder = self.directory / UPLOADS_FOLDER / class_name
            folder.mkdir(parents=True, exist_ok=True)
            paths = [folder / f"{uuid.uuid4().hex}{EXTENSIONS[image_format(data)]}"
                     for _, data in images]
            try:
                for path, (_, data) in zip(paths, images, strict=True):
                    atomic_write(path, lambda handle, data=data: handle.write(data))
                added = searcher.add(paths, class_name, **self.run_options)
            except BaseException:
                _discard(paths, load_catalog(self.directory, with_vectors=False).paths)
                raise
            with self.lock:
                self._load()
            _discard(paths, self.searcher.catalog.paths)  # those the embedder could not read
        return added

    def check_images(self, images: list[tuple[str, bytes]]) -> None:
        """Refuse what is not an image, or is a bomb, before it is queued."""
        for name, data in images:
            decode_image(data, _printable(name), self.max_pixels)

    def search(self, batch: list[_Pending]) -> list[list[dict]]:
        """Embed every image of the batch at once, then match each request on its own terms.
        The client's file names are only echoed back: the temporary files are named by
        position, so no name a client sends reaches a path."""
        searcher = self.current()
        with tempfile.TemporaryDirectory(prefix="ascension-serve-") as folder:
            paths, owners = [], []
            for number, pending in enumerate(batch):
                for position, (name, data) in enumerate(pending.images):
                    path = Path(folder) / f"{number}-{position}.img"
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


def _discard(paths: list[Path], held: list[str]) -> None:
    """Remove the photos of ``paths`` that the catalogue (its ``held`` paths) does not hold."""
    kept = set(held)
    for path in paths:
        if path.resolve().as_posix() not in kept:
            path.unlink(missing_ok=True)


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
            await self._answer(batch, started)

    async def _answer(self, batch: list[_Pending], started: float) -> None:
        """Answer a batch with one forward pass; if it fails, each request alone, so one bad
        request fails only itself."""
        try:
            answers = await asyncio.to_thread(self.lookup.search, batch)
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear of it
            if len(batch) > 1:
                for pending in batch:
                    await self._answer([pending], started)
                return
            batch[0].done.set_exception(exc)
            return
        for pending, results in zip(batch, answers, strict=True):
            pending.done.set_result((results, started))


__all__ = ["Batcher", "ImageDecodeError", "Lookup"]


SETTINGS_VARIABLE = "ASCENSION_SERVE_SETTINGS"
MAX_LABEL_BYTES = 200  # a folder name: file systems allow 255 bytes
MAX_NAME_CHARS = 255  # of a client's file name, echoed back in the results


def _printable(name: str) -> str:
    """A client's file name fit for an error message: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)[:120]


def _text_field(form: Any, name: str) -> str | None:
    """A form field that must be text (a file sent under its name is refused)."""
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a text field, not a file")
    return value


def _search_options(form: Any) -> tuple[int, float | None]:
    """``k`` and ``threshold`` of a search form; ValueError says what is wrong with them."""
    k_text, threshold_text = _text_field(form, "k"), _text_field(form, "threshold")
    try:
        k = int(k_text or 5)
        threshold = None if threshold_text in (None, "") else float(threshold_text)
    except ValueError:
        raise ValueError("k must be a whole number and threshold a number") from None
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be from 1 to 1000 (got {k})")
    if threshold is not None and not -1 <= threshold <= 1:  # also refuses nan
        raise ValueError(f"threshold must be from -1 to 1 (got {threshold})")
    return k, threshold


def _search_problem(form: Any) -> str | None:
    try:
        _search_options(form)
    except ValueError as exc:
        return str(exc)
    return None


def _label_problem(form: Any) -> str | None:
    """A label becomes a folder name under uploads/: limits in bytes, as the file system
    counts them, and nothing a path could be made of."""
    try:
        label = _text_field(form, "label") or ""
    except ValueError as exc:
        return str(exc)
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        return "label must be valid UTF-8 text"
    if (not label or label.startswith(".") or label != label.strip()
            or any(c in label for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in label)
            or size > MAX_LABEL_BYTES):
        return (f"label must be a class name: no slashes or control characters, not hidden, "
                f"at most {MAX_LABEL_BYTES} bytes in UTF-8")
    return None


def _token_matches(header: str, token: str) -> bool:
    """Compare as bytes: a header may hold any byte (Starlette decodes it as latin-1), which
    ``secrets.compare_digest`` on text refuses with an exception."""
    return secrets.compare_digest(header.encode("latin-1", "replace"),
                                  f"Bearer {token}".encode("latin-1", "replace"))


def app_from_environment() -> FastAPI:
    """The app each process of ``serve --workers N`` builds (uvicorn calls this factory)."""
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    return create_app(Path(settings.pop("catalog")), **settings)


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _failure(exc: Exception) -> JSONResponse:
    """What a request that failed past its checks is told: 400 for its own image, 503 while the
    catalogue cannot be read, 507 for a full disk, else 500; always one JSON line."""
    if isinstance(exc, ImageDecodeError):
        return _problem(400, str(exc))
    if isinstance(exc, CatalogError):
        return _problem(503, f"the catalogue cannot be read now: {exc}")
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return _problem(507, f"cannot write to the catalogue: {exc.strerror}")
    print(f"error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr, flush=True)
    return _problem(500, f"internal error ({type(exc).__name__}); the service logged it")


class _TooLarge(Exception):
    pass


def _limited(request: Request, limit: int) -> Request:
    """The request with its body counted as it arrives: past ``limit`` bytes, reading stops
    (with or without a Content-Length, chunked uploads included)."""
    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
        return message

    return Request(request.scope, receive)


def _too_large(limit: int, size: int | None = None) -> JSONResponse:
    what = f"upload of {size} bytes" if size is not None else "upload"
    return _problem(413, f"{what} is over the limit of {limit} bytes (--max-upload-mb)")


async def _read_form(request: Request, limit: int) -> Any:
    """The multipart form, or the 4xx response saying why it cannot be read."""
    try:
        size = int(request.headers.get("content-length") or 0)
    except ValueError:
        return _problem(400, "Content-Length is not a number")
    if size > limit:
        return _too_large(limit, size)
    try:
        return await _limited(request, limit).form()
    except _TooLarge:
        return _too_large(limit)
    except Exception as exc:  # noqa: BLE001 - a malformed body, whatever the parser raises
        status = getattr(exc, "status_code", 400)
        detail = getattr(exc, "detail", None) or first_line(exc)
        return _problem(status if 400 <= status < 500 else 400,
                        f"not a multipart form: {str(detail)[:200]}")


async def _read_images(
    request: Request, lookup: Lookup, max_upload_bytes: int,
    check: Callable[[Any], str | None],
) -> tuple[Any, list[tuple[str, bytes]] | Response]:
    """The form and its checked images, or the 4xx response saying what is wrong (the form's
    other fields are ``check``ed before the images are decoded). Decoding runs in a worker
    thread, so a bomb or a large batch never holds up the event loop."""
    form = await _read_form(request, max_upload_bytes)
    if isinstance(form, Response):
        return None, form
    message = check(form)
    if message is not None:
        return form, _problem(400, message)
    uploads = [item for item in form.getlist("image") if isinstance(item, UploadFile)]
    if not uploads:
        return form, _problem(400, "no image: send one or more files in the multipart field "
                                   "'image'")
    images = [((upload.filename or "upload")[:MAX_NAME_CHARS], await upload.read())
              for upload in uploads]
    try:
        await asyncio.to_thread(lookup.check_images, images)
    except ImageDecodeError as exc:
        return form, _problem(400, str(exc))
    return form, images


def _reading_routes(app: FastAPI, lookup: Lookup) -> None:
    """The page, the catalogue's facts and its thumbnails."""

    @app.get("/healthz")
    async def healthz() -> dict:  # on the event loop itself: it answers while workers are busy
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
        from ascension_cli.serve.page import PAGE

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
        try:
            results, waited = await batcher.submit(_Pending(images, k, threshold))
        except Exception as exc:  # noqa: BLE001 - a JSON answer, never a traceback
            return _failure(exc)
        return JSONResponse({"k": k, "threshold": threshold, "waited_ms": waited * 1000,
                             "results": results})

    @app.post("/items")
    async def add_items(request: Request) -> Response:
        if token is None:
            return _problem(403, "writes are off: start the service with --allow-writes and "
                                 "--token")
        if not _token_matches(request.headers.get("authorization", ""), token):
            return _problem(401, "a wrong or missing token (Authorization: Bearer TOKEN)")
        form, images = await _read_images(request, lookup, max_upload_bytes, _label_problem)
        if isinstance(images, Response):
            return images
        try:
            added = await asyncio.to_thread(lookup.add, images, str(form.get("label")))
        except Exception as exc:  # noqa: BLE001 - a JSON answer, never a traceback
            return _failure(exc)
        return JSONResponse({"added": added, "items": len(lookup.current().catalog)})

    return app
