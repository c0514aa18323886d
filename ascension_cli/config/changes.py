"""The options of ``ascension catalog``'s commands, which maintain a catalogue in place:
remove, relabel, replace, history and snapshot (and ``index --photos``, which says whether a
catalogue keeps its own copy of each photo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ascension_cli.config.commands import _RunOptions
from ascension_cli.config.fields import (
    CatalogFolder,
    CatalogLocation,
    CheckpointFile,
    ExistingFile,
    ImageSource,
    OutputFile,
)

MAX_GIVEN = 1024  # characters of a photo's path or an item id given on the command line
Given = Annotated[str, Field(min_length=1, max_length=MAX_GIVEN)]
FROM_HELP = ("A JSON file of changes to review and apply in one step: a list of entries, each "
             "naming a photo ('path') or a whole item ('item'), with for a relabel its new "
             "'class' and/or 'new_item'; or the report of `ascension index --check --json`, "
             "whose suspected label errors are taken (each with its suggested class). Delete "
             "the entries you do not want applied.")


class _Selecting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    catalog: CatalogLocation = Field(description="A catalogue from `ascension index`: its "
                                     "folder, or milvus://HOST:PORT/COLLECTION.")
    photos: list[Given] = Field(
        default_factory=list, description="A photo: its path as `search` shows it, or a file "
        "name only one photo has (repeat the option).", json_schema_extra={"flags": ["--photo"]})
    items: list[Given] = Field(
        default_factory=list, description="A whole item, by its id (repeat the option).",
        json_schema_extra={"flags": ["--item"]})
    from_file: Path | None = Field(None, description=FROM_HELP,
                                   json_schema_extra={"flags": ["--from"]})
    json_file: OutputFile | None = Field(
        None, description="Write what the change touched (and each touched item's nearest item "
        "of another class) to this JSON file.", json_schema_extra={"flags": ["--json"]})

    @model_validator(mode="after")
    def _something(self) -> _Selecting:
        if not (self.photos or self.items or self.from_file):
            raise ValueError("name what to change: --photo, --item or --from FILE")
        return self


class RemoveConfig(_Selecting):
    """Options of ``ascension catalog remove``."""


class RelabelConfig(_Selecting):
    """Options of ``ascension catalog relabel``."""

    class_name: Given | None = Field(None, description="The class to file them under.",
                                     json_schema_extra={"flags": ["--class"]})
    new_item: Given | None = Field(None, description="The item id to give them.")

    @model_validator(mode="after")
    def _new_label(self) -> RelabelConfig:
        if (self.photos or self.items) and self.class_name is None and self.new_item is None:
            raise ValueError("a relabel needs --class, --new-item or both")
        return self


class ReplaceConfig(_RunOptions):
    """Options of ``ascension catalog replace``."""

    catalog: CatalogLocation = Field(description="A catalogue from `ascension index`: its "
                                     "folder, or milvus://HOST:PORT/COLLECTION.")
    photo: Given = Field(description="The photo to replace, as `search` shows it.")
    new_photo: ExistingFile = Field(description="The new photo: same class and item, new "
                                   "vector.")


class HistoryConfig(BaseModel):
    """Options of ``ascension catalog history``."""

    model_config = ConfigDict(extra="forbid")

    catalog: CatalogLocation = Field(description="A catalogue from `ascension index`: its "
                                     "folder, or milvus://HOST:PORT/COLLECTION.")
    last: int = Field(20, ge=1, description="Show the latest this many changes.")
    json_file: OutputFile | None = Field(None, description="Write the whole history to this "
                                         "JSON file.", json_schema_extra={"flags": ["--json"]})


class SnapshotConfig(BaseModel):
    """Options of ``ascension catalog snapshot``."""

    model_config = ConfigDict(extra="forbid")

    catalog: CatalogFolder = Field(description="A catalogue folder from `ascension index`.")
    destination: Path = Field(description="A new folder for the copy.")


class UpgradeConfig(_RunOptions):
    """Options of ``ascension catalog upgrade``."""

    catalog: CatalogLocation = Field(description="A catalogue from `ascension index`: its "
                                     "folder, or milvus://HOST:PORT/COLLECTION.")
    checkpoint: CheckpointFile = Field(description="The new model: a checkpoint from "
                                       "`ascension train`.")
    gate_photos: ImageSource | None = Field(
        None, description="Labelled photos to measure both models on, some of classes the "
        "catalogue lacks (default: those it was calibrated on).",
        json_schema_extra={"flags": ["--photos"]})
    tolerance: float = Field(0.01, ge=0, le=1, description="How much Recall@1 (of the known "
                             "photos) or FNMR the new model may lose before it is refused.")
    force: bool = Field(False, description="Switch even to a worse model, or with nothing "
                        "to measure it on.")
    json_file: OutputFile | None = Field(None, description="Write both models' figures to "
                                         "this JSON file.",
                                         json_schema_extra={"flags": ["--json"]})


class RollbackConfig(BaseModel):
    """Options of ``ascension catalog rollback``."""

    model_config = ConfigDict(extra="forbid")

    catalog: CatalogLocation = Field(description="A catalogue from `ascension index`: its "
                                     "folder, or milvus://HOST:PORT/COLLECTION.")
