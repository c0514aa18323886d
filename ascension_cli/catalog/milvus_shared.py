"""Where this machine reaches a Milvus catalogue's shared store (its model and photos).

The catalogue records the folder its writer used (``index --shared DIR``). A service machine
that reaches the store elsewhere says so in ``ASCENSION_MILVUS_SHARED``: a folder (the same
store mounted at another path), or an ``http://``/``https://`` URL that serves the store's
files (a web server over the folder, a bucket's public or proxied endpoint). Over
HTTP the store is read-only: the model is fetched once into a cache folder
(``ASCENSION_CACHE``, default ``~/.cache/ascension``), checked by its sha256 and replaced
atomically, and every change that writes photos or parts is refused on that machine.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from ascension_cli.atomic import atomic_write
from ascension_cli.catalog.photos import verified
from ascension_cli.errors import CatalogError, Refused

SHARED_VARIABLE = "ASCENSION_MILVUS_SHARED"
CACHE_VARIABLE = "ASCENSION_CACHE"
MODEL_FILE = re.compile(r"models/[0-9a-f]{64}\.pt")  # how the store names a model
MAX_MODEL_BYTES = 8 << 30
TIMEOUT = 30.0  # seconds a read from the store may wait
CHUNK = 1 << 20  # bytes read from the store at once


def over_http(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this machine reaches the shared store over HTTP (read-only)."""
    given = (os.environ if environ is None else environ).get(SHARED_VARIABLE, "")
    return given.strip().lower().startswith(("http://", "https://"))


def refuse_writes_over_http() -> None:
    """Refuse, on a machine that reads the shared store over HTTP, a change that keeps photos
    or parts in it."""
    if over_http():
        raise Refused(f"this machine reads the shared store over HTTP ({SHARED_VARIABLE}), "
                      "which is read-only: make changes that keep photos, and upgrades, where "
                      "the store is a folder")


def _address(parts: urllib.parse.SplitResult) -> str:
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


def shown(url: str) -> str:
    """A URL as a message may show it: no user, password, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, _address(parts), parts.path, "", ""))


def request(url: str) -> urllib.request.Request:
    """A GET of ``url``, its user and password (if it names them) sent as Basic credentials,
    never left in the address nor sent on to where a redirect points."""
    parts = urllib.parse.urlsplit(url)
    asked = urllib.request.Request(urllib.parse.urlunsplit(
        (parts.scheme, _address(parts), parts.path, parts.query, "")))
    if parts.username is not None:
        pair = ":".join(urllib.parse.unquote(part or "")
                        for part in (parts.username, parts.password))
        asked.add_unredirected_header(
            "Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    return asked


def shared_home(owner: str, recorded: str, model_file: str, model_sha256: str | None,
                environ: Mapping[str, str] | None = None) -> Path:
    """The folder this machine reads the catalogue ``owner``'s model (and photos) from: the one
    the catalogue recorded, the one ``ASCENSION_MILVUS_SHARED`` names, or a cache of the model
    fetched from its URL; its model checked by sha256 here, once a read."""
    environ = os.environ if environ is None else environ
    given = environ.get(SHARED_VARIABLE, "").strip()
    if over_http(environ):
        if not MODEL_FILE.fullmatch(model_file) or not model_sha256:
            raise CatalogError("the catalogue's model is not named by its sha256: it cannot be "
                               "fetched over HTTP (build the catalogue again with this version)")
        cache = Path(environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "ascension")
        home = cache / "shared" / hashlib.sha256(given.encode("utf-8")).hexdigest()[:16]
        if not verified(home / model_file, model_sha256):
            fetch(f"{given.rstrip('/')}/{model_file}", home / model_file, model_sha256)
        return home
    home = Path(given or recorded)
    if not verified(home / model_file, model_sha256):
        raise CatalogError(f"{owner}'s model in the shared store is missing or not the one the "
                           "catalogue was built with (its sha256 differs)")
    return home


def fetch(url: str, target: Path, sha256: str) -> None:
    """Download ``url`` to ``target`` (atomically: nothing is left if it fails), refusing it
    unless its sha256 is ``sha256``; bounded in size and in each read's wait."""
    def download(out) -> None:
        digest, size = hashlib.sha256(), 0
        with urllib.request.urlopen(request(url), timeout=TIMEOUT) as answer:
            while chunk := answer.read(CHUNK):
                size += len(chunk)
                if size > MAX_MODEL_BYTES:
                    raise CatalogError(f"{shown(url)} is larger than a model can be "
                                       f"({MAX_MODEL_BYTES >> 30} GiB)")
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise CatalogError(f"the model at {shown(url)} is not the one the catalogue was "
                               "built with (its sha256 differs)")

    try:
        atomic_write(target, download)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "code", None) or type(exc).__name__
        raise CatalogError(f"the catalogue's model cannot be fetched from {shown(url)} "
                           f"({reason}); is {SHARED_VARIABLE} right?") from None
