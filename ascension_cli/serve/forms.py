"""What a request may send, read safely: the upload limit counted on the bytes received, form
fields that must be text, the search options, a label fit to be a folder name, the write
token; and what a failed request is told (a 4xx or 5xx JSON line)."""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile  # what form() gives (FastAPI's subclasses it)

from ascension_cli.errors import (
    STORAGE_ERRNOS,
    CatalogError,
    DataError,
    ImageDecodeError,
    first_line,
)
from ascension_cli.serve.schemas import DEFAULT_K, K_RANGE, MAX_LABEL_BYTES

if TYPE_CHECKING:
    from ascension_cli.serve.lookup import Lookup, Upload

MAX_NAME_CHARS = 255  # of a client's file name, echoed back in the results


def text_field(form: Any, name: str) -> str | None:
    """A form field that must be text (a file sent under its name is refused)."""
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a text field, not a file")
    return value


def search_options(form: Any) -> tuple[int, float | None, str]:
    """``k``, ``threshold`` and ``group_by`` of a search form; ValueError says what is wrong
    with them."""
    k_text, threshold_text = text_field(form, "k"), text_field(form, "threshold")
    group_by = text_field(form, "group_by") or "photo"
    if group_by not in ("photo", "item"):
        raise ValueError("group_by must be photo or item")
    try:
        k = int(k_text or DEFAULT_K)
        threshold = None if threshold_text in (None, "") else float(threshold_text)
    except ValueError:
        raise ValueError("k must be a whole number and threshold a number") from None
    if not K_RANGE[0] <= k <= K_RANGE[1]:
        raise ValueError(f"k must be from {K_RANGE[0]} to {K_RANGE[1]} (got {k})")
    if threshold is not None and not -1 <= threshold <= 1:  # also refuses nan
        raise ValueError(f"threshold must be from -1 to 1 (got {threshold})")
    return k, threshold, group_by


def search_problem(form: Any) -> str | None:
    try:
        search_options(form)
    except ValueError as exc:
        return str(exc)
    return None


def label_problem(form: Any) -> str | None:
    """A label becomes a folder name under uploads/: limits in bytes, as the file system
    counts them, and nothing a path could be made of."""
    try:
        label = text_field(form, "label") or ""
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


def token_matches(header: str, token: str) -> bool:
    """Compare as bytes: a header may hold any byte (Starlette decodes it as latin-1), which
    ``secrets.compare_digest`` on text refuses with an exception."""
    return secrets.compare_digest(header.encode("latin-1", "replace"),
                                  f"Bearer {token}".encode("latin-1", "replace"))


def problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# What a client is told while the catalogue cannot be read: why, with its file names and
# paths, goes to the service's log only (an unauthenticated client learns no server path).
UNREADABLE = ("the catalogue cannot be read now (damaged, or being replaced); the service "
              "logged why")


def unreadable(exc: Exception) -> JSONResponse:
    """503 for a catalogue that cannot be read; the reason, which names server paths, logged."""
    print(f"error: {first_line(exc, 500)}", file=sys.stderr, flush=True)
    return problem(503, UNREADABLE)


def failure(exc: Exception) -> JSONResponse:
    """What a request that failed past its checks is told: 400 for its own image, 404 for a
    photo or item the catalogue lacks, 409 for an item it would file under a second class, 503
    while the catalogue cannot be read, 507 for a full disk, else 500; always one JSON line."""
    if isinstance(exc, ImageDecodeError):
        return problem(400, str(exc))
    if isinstance(exc, CatalogError) and exc.status != 503:  # an item clash, a missing photo
        return problem(exc.status, str(exc))
    if isinstance(exc, DataError):  # a new photo that cannot be read, a relabel of nothing
        return problem(400, first_line(exc))
    if isinstance(exc, CatalogError):
        return unreadable(exc)
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return problem(507, f"cannot write to the catalogue: {exc.strerror}")
    print(f"error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr, flush=True)
    return problem(500, f"internal error ({type(exc).__name__}); the service logged it")


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
    return problem(413, f"{what} is over the limit of {limit} bytes (--max-upload-mb)")


def _declared_too_large(request: Request, limit: int) -> JSONResponse | None:
    """The 4xx answer to a body whose Content-Length is not a number or is over ``limit``."""
    try:
        size = int(request.headers.get("content-length") or 0)
    except ValueError:
        return problem(400, "Content-Length is not a number")
    return _too_large(limit, size) if size > limit else None


async def read_form(request: Request, limit: int) -> Any:
    """The multipart form, or the 4xx response saying why it cannot be read."""
    if (refused := _declared_too_large(request, limit)) is not None:
        return refused
    try:
        return await _limited(request, limit).form()
    except _TooLarge:
        return _too_large(limit)
    except Exception as exc:  # noqa: BLE001 - a malformed body, whatever the parser raises
        status = getattr(exc, "status_code", 400)
        detail = getattr(exc, "detail", None) or first_line(exc)
        return problem(status if 400 <= status < 500 else 400,
                        f"not a multipart form: {str(detail)[:200]}")


async def read_images(
    request: Request, lookup: Lookup, max_upload_bytes: int,
    check: Callable[[Any], str | None],
) -> tuple[Any, list[Upload] | Response]:
    """The form and its images, each decoded once, or the 4xx response saying what is wrong
    (the form's other fields are ``check``ed before the images are decoded). Decoding runs in a
    worker thread, so a bomb or a large batch never holds up the event loop."""
    form = await read_form(request, max_upload_bytes)
    if isinstance(form, Response):
        return None, form
    message = check(form)
    if message is not None:
        return form, problem(400, message)
    uploads = [item for item in form.getlist("image") if isinstance(item, UploadFile)]
    if not uploads:
        return form, problem(400, "no image: send one or more files in the multipart field "
                                   "'image'")
    images = [((upload.filename or "upload")[:MAX_NAME_CHARS], await upload.read())
              for upload in uploads]
    try:
        return form, await asyncio.to_thread(lookup.check_images, images)
    except ImageDecodeError as exc:
        return form, problem(400, str(exc))


async def read_json(request: Request, model: type[BaseModel], limit: int) -> Any:
    """A JSON body as ``model``, or the 4xx response saying what is wrong with it (read at most
    ``limit`` bytes)."""
    if (refused := _declared_too_large(request, limit)) is not None:
        return refused
    try:
        body = await _limited(request, limit).body()
    except _TooLarge:
        return _too_large(limit)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(part) for part in errors[0]["loc"]) if errors else "body"
        message = errors[0]["msg"] if errors else "not valid"
        return problem(400, f"not a valid request: {where or 'body'}: {message}"[:300])
