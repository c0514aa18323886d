"""The options of the catalogue's commands: index, search, calibrate and serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ascension_cli.catalog_layout import SERVER_ONLY_KINDS, catalog_folder, is_milvus
from ascension_cli.config.commands import _RunOptions
from ascension_cli.config.fields import (
    CHANNELS_LAST_HELP,
    DEVICE_HELP,
    SHORT_O,
    CatalogIndexKind,
    CatalogLocation,
    CatalogOutput,
    CheckpointFile,
    Features,
    FileOrFolder,
    GroupBy,
    ImageSource,
    OutputFile,
    PhotoMode,
    Precision,
    Split,
    check_device,
    check_path,
    features_field,
    held_out_seed_field,
    split_field,
    target_fmr_field,
    unknown_classes_field,
)
from ascension_cli.formats import DEFAULT_MAX_PIXELS


class IndexConfig(_RunOptions):
    """Options of ``ascension index``."""

    checkpoint: CheckpointFile | None = Field(
        None, description="A checkpoint from `ascension train` (not needed to --check a "
        "catalogue as it is).")
    gallery_root: ImageSource | None = Field(
        None, description="The known items: class folders, a flat image folder, or a manifest."
    )
    split: Split | None = split_field()
    features: Features = features_field()
    output: CatalogOutput = Field(
        description="Catalogue to write: a folder, or milvus://HOST:PORT/COLLECTION (then "
        "--shared names where the model and photos go).", json_schema_extra=SHORT_O)
    shared: Path | None = Field(
        None, description="For a Milvus catalogue: a folder every service machine reaches, "
        "where the model and the photos are kept (each checked by its sha256 when read).")
    add: bool = Field(
        False, description="Append the images the catalogue does not hold yet, without "
        "re-embedding the others (same checkpoint required)."
    )
    check: bool = Field(
        False, description="Then list what to clean in the whole catalogue: item pairs of "
        "different classes a search may take for each other (as similar as the calibrated "
        "threshold, else 0.9), near-duplicate photos filed under two classes, and photos whose "
        "5 nearest neighbours all agree on another class (suspected label errors). Without "
        "CHECKPOINT and GALLERY_ROOT: check the catalogue --output names, as it is.")
    json_file: OutputFile | None = Field(
        None, description="Write what was added (each new item's nearest item of another "
        "class) and the check to this JSON file.", json_schema_extra={"flags": ["--json"]})
    photos: PhotoMode = Field(
        "copy", description="copy: keep each photo inside the catalogue (photos/, by its "
        "sha256), so it can be moved, backed up and embedded again on its own. reference: keep "
        "only each photo's path and sha256 (for very large sets), checked before it is embedded "
        "again. (with --add: for the photos added)")
    kind: CatalogIndexKind | None = Field(
        None, description="The index (FAISS's, or on Milvus the server's). flat: exact, 4 x "
        "dimension bytes a vector. ivfpq: inverted lists of compressed codes (a few dozen bytes "
        "a vector), for millions of items. hnsw: a graph over the full vectors, fast and "
        "accurate, more memory. ivf: lists of full vectors. diskann (Milvus only): a graph "
        "kept on the server's disk, for catalogues past its memory. Lists, probes and code size "
        "follow the catalogue's size; the recall against exact search is measured on held-out "
        "items. (default: flat; with --add, the catalogue's)")

    @model_validator(mode="after")
    def _check_catalog(self) -> IndexConfig:
        if (self.checkpoint is None) != (self.gallery_root is None):
            raise ValueError("give both CHECKPOINT and GALLERY_ROOT (or neither, with --check)")
        if self.checkpoint is None and not self.check:
            raise ValueError("CHECKPOINT and GALLERY_ROOT are needed to build a catalogue "
                             "(without them, --check checks one as it is)")
        if (self.add or self.checkpoint is None) and not is_milvus(self.output):
            check_path(catalog_folder, self.output, "output")
        if self.kind in SERVER_ONLY_KINDS and not is_milvus(self.output):
            raise ValueError(f"--kind {self.kind} is an index of a Milvus server; a folder "
                             "catalogue has flat, hnsw, ivf or ivfpq")
        if is_milvus(self.output) and self.checkpoint is not None and not self.add and (
                self.shared is None):
            raise ValueError("a Milvus catalogue needs --shared DIR: where its model and "
                             "photos are kept")
        return self

    @property
    def builds(self) -> bool:
        """Whether images are embedded into the catalogue (not only a check of it)."""
        return self.checkpoint is not None


class SearchConfig(_RunOptions):
    """Options of ``ascension search``."""

    catalog: CatalogLocation = Field(description="A catalogue from `ascension index`: its "
                                     "folder, or milvus://HOST:PORT/COLLECTION.")
    images: list[FileOrFolder] = Field(min_length=1,
                                       description="Query images, or folders of them.")
    k: int = Field(5, ge=1, le=1000, description="Matches per query.")
    threshold: float | None = Field(
        None, ge=-1, le=1, description="Cosine similarity the best match must reach; below it "
        "the query is 'unknown'. (default: the catalogue's, if `ascension calibrate` set one)"
    )
    json_file: OutputFile | None = Field(None, description="Write the results to this JSON file.",
                                         json_schema_extra={"flags": ["--json"]})
    group_by: GroupBy = Field(
        "photo", description="photo: the k most similar photos. item: the k most similar "
        "items (a manifest's item_id, else the class), each by its best photo, so several "
        "photos of one item count once.")


class CalibrateConfig(_RunOptions):
    """Options of ``ascension calibrate``."""

    catalog: CatalogLocation = Field(description="A catalogue from `ascension index`: its "
                                     "folder, or milvus://HOST:PORT/COLLECTION.")
    images: ImageSource = Field(
        description="Labelled photos the catalogue was not built from (class folders or a "
        "manifest), some of classes it lacks: the unknowns a threshold must refuse.")
    target_fmr: float = target_fmr_field(
        "The share of new photos of items the catalogue lacks that the threshold should accept, "
        "on average (never more than this share of IMAGES' unknowns).")
    unknown_classes: float | None = unknown_classes_field(
        "Also hold out this share of the catalogue's classes (seeded) as unknowns, when IMAGES "
        "has few classes the catalogue lacks.")
    seed: int = held_out_seed_field()
    split: Split | None = split_field()


class ServeConfig(BaseModel):
    """Options of ``ascension serve``."""

    model_config = ConfigDict(extra="forbid")

    catalog: CatalogLocation = Field(description="A catalogue from `ascension index`: its "
                                     "folder, or milvus://HOST:PORT/COLLECTION (any number of "
                                     "services, on any machines, may answer from one).")
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on; 0.0.0.0 "
                      "opens the service to the network (put it behind a reverse proxy).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free one).")
    batch_size: int = Field(64, ge=1, description="Images per forward pass.")
    precision: Precision = Field("auto", description="Arithmetic of the forward pass.")
    device: str = Field("auto", description=DEVICE_HELP)
    channels_last: bool = Field(True, description=CHANNELS_LAST_HELP)
    batch_window_ms: float = Field(
        5.0, ge=0, le=1000, description="How long a request waits for others to share its "
        "forward pass.")
    max_upload_mb: float = Field(50.0, gt=0, description="Largest upload accepted, in MB.")
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Refuse images with more pixels than this.")
    workers: int = Field(1, ge=1, le=64, description="Server processes, each with the model "
                         "loaded (on a GPU keep 1: batching already fills it).")
    allow_writes: bool = Field(False, description="Accept POST /items, which adds photos to the "
                               "catalogue; needs --token.")
    token: str | None = Field(None, min_length=12, description="The secret the writing routes "
                              "(POST /items, /items/remove, /items/relabel, /items/replace) "
                              "must send as 'Authorization: Bearer TOKEN' (12 characters or "
                              "more).")
    token_name: str = Field("default", min_length=1, max_length=64, pattern=r"^[\w.@-]+$",
                            description="Who the catalogue's history says made a write "
                            "through this service (token:NAME), e.g. the till or shop.")

    _check_device = field_validator("device")(check_device)

    @model_validator(mode="after")
    def _check_writes(self) -> ServeConfig:
        if self.allow_writes != (self.token is not None):
            raise ValueError("writes need both --allow-writes and --token (the one without the "
                             "other does nothing)")
        return self

    def run_options(self) -> dict[str, Any]:
        """The ``embed.pipeline.EmbedOptions`` these options set, as keywords."""
        return {"batch_size": self.batch_size, "precision": self.precision, "workers": 0,
                "device": self.device, "channels_last": self.channels_last}

    def app_options(self) -> dict[str, Any]:
        """The keyword arguments of ``serve.create_app``."""
        return {"run_options": self.run_options(), "max_pixels": self.max_image_pixels,
                "max_upload_bytes": int(self.max_upload_mb * 1e6),
                "batch_window": self.batch_window_ms / 1000,
                "token": self.token if self.allow_writes else None,
                "token_name": self.token_name}
