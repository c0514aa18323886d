"""The routes that change the catalogue, each behind the write token: add photos of an item
(``POST /items``), remove, relabel or replace photos and items (``POST /items/remove``,
``/items/relabel``, ``/items/replace``). Each runs one of the store's changes
(``catalog/folder_store.py``) in a worker thread, records who made it (``token:NAME``), and
answers what it touched, with the onboarding check of each item it touched."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ascension_cli.catalog.edit import Relabel, Selection
from ascension_cli.data.image_header import EXTENSIONS, image_format
from ascension_cli.serve.forms import (
    failure,
    label_problem,
    problem,
    read_images,
    read_json,
    text_field,
    token_matches,
)
from ascension_cli.serve.lookup import Lookup
from ascension_cli.serve.schemas import (
    ERRORS,
    MAX_CHANGE_BYTES,
    AddAnswer,
    ChangeAnswer,
    ItemsForm,
    RelabelForm,
    ReplaceForm,
    SelectionForm,
    form_body,
    json_body,
)


def _refused(request: Request, token: str | None) -> Response | None:
    """403 while writes are off, 401 for a wrong token; None lets the change through."""
    if token is None:
        return problem(403, "writes are off: start the service with --allow-writes and --token")
    if not token_matches(request.headers.get("authorization", ""), token):
        return problem(401, "a wrong or missing token (Authorization: Bearer TOKEN)")
    return None


async def _run(lookup: Lookup, operation: str, *arguments: Any, **options: Any) -> Response:
    """One store change in a worker thread, answered as ``ChangeAnswer`` or a JSON error."""
    first = arguments[0][0].selection if isinstance(arguments[0], list) else arguments[0]
    if isinstance(first, Selection) and not first:
        return problem(400, "name the photos or items to change ('photos', 'items')")
    try:
        changed = await asyncio.to_thread(lookup.change, operation, *arguments, **options)
    except Exception as exc:  # noqa: BLE001 - a JSON answer, never a traceback
        return failure(exc)
    return JSONResponse(changed.to_dict())


async def _authorised_json(request: Request, token: str | None, model) -> Any:
    """The request's JSON body as ``model`` once the token is right, or the 4xx answer."""
    if (refused := _refused(request, token)) is not None:
        return refused
    return await read_json(request, model, MAX_CHANGE_BYTES)


def _photo_problem(form: Any) -> str | None:
    try:
        photo = text_field(form, "photo")
    except ValueError as exc:
        return str(exc)
    return None if photo else "photo: name the photo to replace, as a search shows it"


def writing_routes(app: FastAPI, lookup: Lookup, token: str | None, token_name: str,
                   max_upload_bytes: int) -> None:
    """``POST /items`` and the changes in place; ``token`` None keeps them off (403)."""
    by = f"token:{token_name}"

    @app.post("/items", response_model=AddAnswer, responses=ERRORS,
              openapi_extra=form_body(ItemsForm))
    async def add_items(request: Request) -> Response:
        if (refused := _refused(request, token)) is not None:
            return refused
        form, images = await read_images(request, lookup, max_upload_bytes, label_problem)
        if isinstance(images, Response):
            return images
        try:
            changed = await asyncio.to_thread(lookup.add, images, str(form.get("label")), by)
        except Exception as exc:  # noqa: BLE001 - a JSON answer, never a traceback
            return failure(exc)
        answer = changed.to_dict()
        return JSONResponse({"added": answer["photos"], "items": answer["total"],
                             "nearest": answer["nearest"], "confusable": answer["confusable"]})

    @app.post("/items/remove", response_model=ChangeAnswer, responses=ERRORS,
              openapi_extra=json_body(SelectionForm))
    async def remove_items(request: Request) -> Response:
        form = await _authorised_json(request, token, SelectionForm)
        if isinstance(form, Response):
            return form
        return await _run(lookup, "remove", _selection(form), by)

    @app.post("/items/relabel", response_model=ChangeAnswer, responses=ERRORS,
              openapi_extra=json_body(RelabelForm))
    async def relabel_items(request: Request) -> Response:
        form = await _authorised_json(request, token, RelabelForm)
        if isinstance(form, Response):
            return form
        if form.class_ is not None and (message := label_problem({"label": form.class_})):
            return problem(400, message.replace("label", "class", 1))
        if form.class_ is None and form.item is None:
            return problem(400, "a relabel needs 'class', 'item' or both")
        return await _run(lookup, "relabel", [Relabel(_selection(form), form.class_, form.item)],
                          by)

    @app.post("/items/replace", response_model=ChangeAnswer, responses=ERRORS,
              openapi_extra=form_body(ReplaceForm))
    async def replace_item(request: Request) -> Response:
        if (refused := _refused(request, token)) is not None:
            return refused
        form, images = await read_images(request, lookup, max_upload_bytes, _photo_problem)
        if isinstance(images, Response):
            return images
        if len(images) != 1:
            return problem(400, "send exactly one new photo in the field 'image'")
        upload = images[0]
        new = (upload.data, EXTENSIONS[image_format(upload.data)], upload.image)
        return await _run(lookup, "replace", str(form.get("photo")), new, by,
                          searcher=lookup.current(), **lookup.run_options)


def _selection(form: SelectionForm) -> Selection:
    return Selection(tuple(form.photos), tuple(form.items))
