"""How a Milvus catalogue reaches its server: the credential and TLS settings, read from the
environment only. A command line is visible to every user of the machine (``ps``) and kept in
shell histories, so a credential never goes there; a secret mounted as a file (a Kubernetes or
Docker secret) is named by ``ASCENSION_MILVUS_TOKEN_FILE``.

- ``ASCENSION_MILVUS_TOKEN``: ``user:password`` or an API key (``ASCENSION_MILVUS_TOKEN_FILE``:
  a file holding it);
- ``ASCENSION_MILVUS_TLS``: ``1`` for TLS checked against the system's certificate authorities,
  or the path of the PEM of the authority that signed the server's certificate;
- ``ASCENSION_MILVUS_CERT`` and ``ASCENSION_MILVUS_KEY``: this machine's certificate and key,
  where the server asks for them (mutual TLS; ``ASCENSION_MILVUS_TLS`` then names the
  authority's PEM).

No message names a credential's value: an error says which variable to look at.

A process keeps one client per server and settings (``client_for``): each holds a gRPC channel
that pings its server, and a client made for every read would pile channels up until the
server refuses them (``too_many_pings``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from ascension_cli.errors import ConfigError

TOKEN_VARIABLE = "ASCENSION_MILVUS_TOKEN"
TOKEN_FILE_VARIABLE = "ASCENSION_MILVUS_TOKEN_FILE"
TLS_VARIABLE = "ASCENSION_MILVUS_TLS"
CERT_VARIABLE, KEY_VARIABLE = "ASCENSION_MILVUS_CERT", "ASCENSION_MILVUS_KEY"
SYSTEM_ROOTS = ("1", "true", "yes")
MAX_TOKEN_BYTES = 4096
_CLIENTS: dict[tuple, object] = {}  # the process's clients, by their settings
CONNECT_PAUSE = 0.5  # seconds before a second try at connecting
# No keepalive pings while no call is in flight: a gRPC server's default policy answers an idle
# connection's pings with GOAWAY (too_many_pings); the next call connects again if need be.
QUIET = {"grpc.keepalive_permit_without_calls": 0}
_CLIENTS_LOCK = threading.Lock()


def _readable(variable: str, environ: Mapping[str, str]) -> Path:
    path = Path(environ[variable])
    if not path.is_file():
        raise ConfigError(f"{variable} names no readable file")
    return path


def _token(environ: Mapping[str, str]) -> str:
    if environ.get(TOKEN_VARIABLE) and environ.get(TOKEN_FILE_VARIABLE):
        raise ConfigError(f"set {TOKEN_VARIABLE} or {TOKEN_FILE_VARIABLE}, not both")
    if not environ.get(TOKEN_FILE_VARIABLE):
        return environ.get(TOKEN_VARIABLE, "")
    path = _readable(TOKEN_FILE_VARIABLE, environ)
    try:
        if path.stat().st_size > MAX_TOKEN_BYTES:
            raise ConfigError(f"the file {TOKEN_FILE_VARIABLE} names is too long for a credential")
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"the file {TOKEN_FILE_VARIABLE} names cannot be read as text") from None


def connection_options(host: str, port: int, environ: Mapping[str, str] | None = None) -> dict:
    """``MilvusClient``'s arguments for the server at ``host:port``, from ``environ`` (the
    process's environment by default)."""
    environ = os.environ if environ is None else environ
    options = {"uri": f"http://{host}:{port}", "token": _token(environ)}
    tls = environ.get(TLS_VARIABLE, "").strip()
    mutual = [name for name in (CERT_VARIABLE, KEY_VARIABLE) if environ.get(name)]
    if mutual and not tls:
        raise ConfigError(f"{mutual[0]} is for TLS: set {TLS_VARIABLE} too (the authority's PEM)")
    if not tls:
        return options
    options.update(uri=f"https://{host}:{port}", secure=True)
    if tls.lower() in SYSTEM_ROOTS:
        if mutual:
            raise ConfigError(f"mutual TLS needs {TLS_VARIABLE} to name the authority's PEM file")
        return options
    authority = str(_readable(TLS_VARIABLE, environ))
    if not mutual:
        return {**options, "server_pem_path": authority}
    if len(mutual) == 1:
        raise ConfigError(f"mutual TLS needs both {CERT_VARIABLE} and {KEY_VARIABLE}")
    return {**options, "ca_pem_path": authority,
            "client_pem_path": str(_readable(CERT_VARIABLE, environ)),
            "client_key_path": str(_readable(KEY_VARIABLE, environ))}


def client_for(host: str, port: int, timeout: float):
    """The process's ``MilvusClient`` for the server at ``host:port`` with this environment's
    settings, made (and connected) on first use."""
    options = connection_options(host, port)
    key = tuple(sorted(options.items()))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            from pymilvus import MilvusClient

            def connect():
                return MilvusClient(timeout=timeout, grpc_options=QUIET, **options)

            try:
                _CLIENTS[key] = connect()
            except Exception:  # noqa: BLE001 - once more: a server may have just closed an
                time.sleep(CONNECT_PAUSE)  # idle connection under us (GOAWAY)
                _CLIENTS[key] = connect()
        return _CLIENTS[key]


def forget(client) -> None:
    """Drop ``client`` (its server failed a call): the next ``client_for`` connects again. It
    is not closed here: another thread may be using it; it goes with its last user."""
    with _CLIENTS_LOCK:
        for key in [key for key, held in _CLIENTS.items() if held is client]:
            del _CLIENTS[key]
