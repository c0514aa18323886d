"""What the service's routes take and answer, as typed models: FastAPI puts them into
``/openapi.json`` (and ``/docs``), so a client can generate code from the schema. The forms are
still read by ``serve/forms.py`` while they arrive (the upload limit counts the bytes received),
with the bounds declared here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

K_RANGE = (1, 1000)  # matches a search may ask for
DEFAULT_K = 5
MAX_LABEL_BYTES = 200  # a class name, kept to what a folder name may be
MAX_SELECTED = 10_000  # photos or items one change may name
MAX_SELECTOR_CHARS = 1024  # a photo's path or an item id, as a change names it
MAX_CHANGE_BYTES = 4_000_000  # a change's JSON body


class SearchForm(BaseModel):
    """``POST /search``, multipart/form-data."""

    image: list[bytes] = Field(description="One or more photos (repeat the field).")
    k: int = Field(DEFAULT_K, ge=K_RANGE[0], le=K_RANGE[1], description="Matches per photo.")
    threshold: float | None = Field(
        None, ge=-1, le=1, description="Below this top similarity a photo is 'not in the "
        "catalogue' (default: the catalogue's calibrated threshold, if any).")
    group_by: Literal["photo", "item"] = Field(
        "photo", description="photo: the k most similar photos; item: the k most similar "
        "items, each by its best photo.")


class ItemsForm(BaseModel):
    """``POST /items``, multipart/form-data, with ``Authorization: Bearer TOKEN``."""

    image: list[bytes] = Field(description="One or more photos of the item (repeat the field).")
    label: str = Field(description="Their class: no slashes or control characters, not hidden, "
                       f"at most {MAX_LABEL_BYTES} bytes in UTF-8.")


class MatchAnswer(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: int = Field(description="The photo's row in the catalogue (/items/{id}/image).")
    item: str | None
    path: str = Field(description="The photo's file name (never a path on the server).")
    class_: str | None = Field(alias="class")
    similarity: float


class ResultAnswer(BaseModel):
    query: str = Field(description="The uploaded file's name, echoed back.")
    predicted: str | None = Field(description="The voted class; null when unknown.")
    score: float = Field(description="The predicted class's share of the vote.")
    unknown: bool = Field(description="The best match is below the threshold.")
    item: str | None = Field(description="The best match's item, unless unknown.")
    matches: list[MatchAnswer]


class SearchAnswer(BaseModel):
    k: int
    threshold: float | None = Field(description="The threshold applied.")
    group_by: Literal["photo", "item"]
    waited_ms: float = Field(description="How long the request queued for a shared batch.")
    results: list[ResultAnswer]


class AddAnswer(BaseModel):
    added: int = Field(description="Photos added (the readable ones).")
    items: int = Field(description="Photos in the catalogue now.")
    nearest: list[dict[str, Any]] = Field(description="Each new item's nearest item of another "
                                          "class.")
    confusable: list[dict[str, Any]] = Field(description="Those as similar as the threshold.")


Name = Annotated[str, Field(min_length=1, max_length=MAX_SELECTOR_CHARS)]


class SelectionForm(BaseModel):
    """``POST /items/remove`` (JSON, with ``Authorization: Bearer TOKEN``): the photos (by the
    file name a search shows, or the path the catalogue records) and whole items to remove."""

    model_config = ConfigDict(extra="forbid")

    photos: list[Name] = Field(default_factory=list, max_length=MAX_SELECTED)
    items: list[Name] = Field(default_factory=list, max_length=MAX_SELECTED)


class RelabelForm(SelectionForm):
    """``POST /items/relabel`` (JSON, with the token): the photos and items to file under a
    new class and/or item id."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_: str | None = Field(None, alias="class", min_length=1,
                               max_length=MAX_LABEL_BYTES, description="The new class.")
    item: Name | None = Field(None, description="The new item id.")


class ReplaceForm(BaseModel):
    """``POST /items/replace``, multipart/form-data, with the token: a new photo in place of one
    the catalogue holds, of the same class and item."""

    photo: str = Field(description="The photo replaced, as a search names it.")
    image: bytes = Field(description="The new photo.")


class ChangeAnswer(BaseModel):
    photos: int = Field(description="Photos the change touched.")
    items: int = Field(description="Items the change touched.")
    total: int = Field(description="Photos in the catalogue now.")
    generation: int = Field(description="The catalogue's generation after the change.")
    nearest: list[dict[str, Any]] = Field(description="Each touched item's nearest item of "
                                          "another class.")
    confusable: list[dict[str, Any]] = Field(description="Those as similar as the threshold.")


class HistoryAnswer(BaseModel):
    changes: int = Field(description="Changes recorded.")
    last: list[dict[str, Any]] = Field(description="The latest changes, newest first.")


class InfoAnswer(BaseModel):
    model: str
    feature_kind: str
    dimension: int
    index: str
    items: int
    classes: int
    catalog: str = Field(description="The catalogue folder's name.")
    catalog_version: int
    calibration: dict[str, Any] | None
    calibration_note: str | None
    history: HistoryAnswer = Field(description="How many changes, and the last few.")


class ErrorAnswer(BaseModel):
    error: str


ERRORS = {status: {"model": ErrorAnswer}
          for status in (400, 401, 403, 404, 409, 413, 503, 507)}


def form_body(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` that documents a route's multipart form by ``model``."""
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": model.model_json_schema()}}}}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` that documents a route's JSON body by ``model``."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema(by_alias=True)}}}}
