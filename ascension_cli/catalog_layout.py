"""A catalogue folder's layout, in one place: its file names, format stamp and versions, and the
names of its generations. Imports nothing of Ascension, so the path checks can use it too.

    catalog.json        format, model identity (spec, checkpoint sha256), feature kind, class
                        names, the index's kind, shape and measured recall against exact search,
                        and the live generation's file names
    model.pt            the model's weights and spec (weights_only-loadable), to embed queries
    model-NNNNNN.pt     the model an upgrade switched to (catalog.json names the live one)
    items-NNNNNN.npz    vectors, labels, absolute paths and item ids of the catalogued images
                        (strings variable-length, ``strings.py``)
    index-NNNNNN.faiss  an inner-product FAISS index over the vectors: exact (flat), or hnsw,
                        ivf or ivfpq for millions of items
    photos/             the photos the catalogue owns, named by their sha256 (``index
                        --photos copy``, the default, and every add since)
    uploads/            photos added through ``serve`` before the catalogue owned its photos
    history.jsonl       one line per change: what, how many photos and items, when, by whom,
                        from which generation to which (``catalog/history.py``)
    .write.lock         held by whoever changes the catalogue, across processes
    .change.json        the photos a change in progress writes and drops, until it settles
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ascension_cli.paths import existing_file, existing_folder, kind_of, output_folder

# Version 2: items and index are written as a new generation of files at each change, and
# catalog.json (written last, atomically) names the live one; version 1 had fixed names.
# Version 3: the items file keeps paths and item ids variable-length (``strings.py``).
CATALOG_FORMAT, CATALOG_VERSION, CATALOG_READABLE = "ascension-catalog", 3, (1, 2, 3)
CATALOG_JSON, MODEL_FILE, ITEMS_FILE, INDEX_FILE = (
    "catalog.json", "model.pt", "items.npz", "index.faiss")
CATALOG_LOCK = ".write.lock"  # held by whoever changes the catalogue, across processes
UPLOADS_FOLDER = "uploads"  # photos added through `serve`, one folder per class
_GENERATION_NAME = re.compile(r"(items-\d{6,}\.npz|index-\d{6,}\.faiss|model-\d{6,}\.pt)")
_WRITER_TEMP = re.compile(
    r"\.(items-\d+\.npz|index-\d+\.faiss|model-\d+\.pt|catalog\.json|model\.pt"
    r"|\.change\.json)\..*\.tmp")
UPLOAD_NAME = re.compile(r"[0-9a-f]{32}\.[a-z0-9]{2,4}")  # what `serve` named an added photo
PHOTOS_FOLDER = "photos"  # the photos a catalogue owns: photos/AB/SHA256.EXT
STORED_NAME = re.compile(r"photos/[0-9a-f]{2}/[0-9a-f]{64}\.[a-z0-9]{2,5}")
PHOTO_MODES = ("copy", "reference")  # index --photos: a copy inside, or a checked reference
HISTORY_FILE = "history.jsonl"
CHANGE_JOURNAL = ".change.json"


def generation_file(name: str) -> bool:
    """Whether ``name`` is one of the items, index or model files a catalogue writer makes (a
    live, an old or a half-written generation), and nothing else a folder may hold."""
    return bool(_GENERATION_NAME.fullmatch(name) or _WRITER_TEMP.fullmatch(name)
                or name in (ITEMS_FILE, INDEX_FILE, MODEL_FILE))


def generation_files(generation: int) -> dict[str, str]:
    """The names of one generation's items and index files (and its model's, for an upgrade:
    ``model_file``)."""
    return {"items": f"items-{generation:06d}.npz", "index": f"index-{generation:06d}.faiss"}


def model_file(generation: int) -> str:
    return f"model-{generation:06d}.pt"


def catalog_files(meta: dict) -> dict[str, str]:
    """The live files a catalog.json names: its generation's items, index and model (model.pt
    until an upgrade), or version 1's fixed names. A name that is not one Ascension writes (a
    path, say) is refused."""
    files = meta.get("files") or {"items": ITEMS_FILE, "index": INDEX_FILE}
    if not isinstance(files, dict):
        raise ValueError(f"{CATALOG_JSON} names files that are not a catalogue's")
    files = {"model": MODEL_FILE, **files}
    prefixes = {"items": "items-", "index": "index-", "model": "model-"}
    if not all(isinstance(files.get(key), str)
               and (files[key] in (ITEMS_FILE, INDEX_FILE, MODEL_FILE)
                    or (_GENERATION_NAME.fullmatch(files[key])
                        and files[key].startswith(prefix)))
               for key, prefix in prefixes.items()):
        raise ValueError(f"{CATALOG_JSON} names files that are not a catalogue's")
    return {key: files[key] for key in prefixes}


def catalog_folder(path: Path) -> Path:
    """A catalogue from ``ascension index``: all its files present, of a version we read."""
    existing_folder(path)
    meta_path = path / CATALOG_JSON
    if not meta_path.exists():
        raise ValueError(f"{path} is not an Ascension catalogue (no {CATALOG_JSON}); build one "
                         "with `ascension index`")
    try:
        meta = json.loads(existing_file(meta_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{meta_path} is damaged; build the catalogue again with "
                         "`ascension index`") from None
    if not isinstance(meta, dict) or meta.get("format") != CATALOG_FORMAT:
        raise ValueError(f"{path} is not an Ascension catalogue ({CATALOG_JSON} is another "
                         "tool's)")
    if meta.get("version") not in CATALOG_READABLE:
        raise ValueError(f"{path} is a version-{meta.get('version')} catalogue; this Ascension "
                         f"reads versions {', '.join(map(str, CATALOG_READABLE))}: build it again "
                         "with `ascension index`")
    names = [CATALOG_JSON, *catalog_files(meta).values()]
    missing = [name for name in names if kind_of(path / name) is not None
               or not (path / name).is_file()]
    if missing:
        raise ValueError(f"catalogue {path} lacks {', '.join(missing)} (copied in part?); "
                         "build it again with `ascension index`")
    return path


# A catalogue in a Milvus collection (``catalog/milvus_store.py``): milvus://HOST:PORT/COLLECTION.
MILVUS_SCHEME = "milvus://"
SERVER_ONLY_KINDS = ("diskann",)  # `index --kind`s a Milvus server builds and FAISS has not
_MILVUS = re.compile(r"milvus://(?P<host>[A-Za-z0-9.-]{1,253}):(?P<port>[0-9]{1,5})"
                     r"/(?P<collection>[A-Za-z_][A-Za-z0-9_]{0,200})")


def is_milvus(location: object) -> bool:
    return isinstance(location, str) and location.startswith(MILVUS_SCHEME)


@dataclass(frozen=True)
class MilvusLocation:
    host: str
    port: int
    collection: str

    @classmethod
    def parse(cls, text: str) -> MilvusLocation:
        match = _MILVUS.fullmatch(text)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"{text[:200]!r} is not a Milvus catalogue's location: give "
                             "milvus://HOST:PORT/COLLECTION (a collection's name is letters, "
                             "digits and _, starting with a letter or _)")
        return cls(match["host"], int(match["port"]), match["collection"])

    def __str__(self) -> str:
        return f"{MILVUS_SCHEME}{self.host}:{self.port}/{self.collection}"


def folder_only(value: object) -> object:
    """Refuse a Milvus location where a command works on catalogue folders only."""
    if str(value).startswith("milvus:"):  # a Path made of it has lost a slash
        raise ValueError("this command works on a catalogue folder; it is not available for a "
                         "Milvus catalogue in this version")
    return value


def catalog_location(value: object) -> Path | str:
    """A catalogue to read: a folder from ``ascension index``, or a Milvus location."""
    if is_milvus(value):
        return str(MilvusLocation.parse(value))
    return catalog_folder(Path(value))


def output_location(value: object) -> Path | str:
    """Where ``index`` writes a catalogue: a folder, or a Milvus location."""
    if is_milvus(value):
        return str(MilvusLocation.parse(value))
    return output_folder(Path(value))
