"""Where a test's catalogue lives: a folder, or a collection on a Milvus Lite gRPC server
started for the tests on 127.0.0.1 at a free port (stopped by its pid). The catalogue tests take
the ``place`` fixture (``conftest.py``) and run once on each store."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

SERVER = Path(sys.executable).with_name("milvus-lite")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Milvus:
    """A Milvus Lite server on 127.0.0.1, stopped by its pid."""

    def __init__(self, data: Path, port: int | None = None):
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [str(SERVER), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Milvus Lite did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def location(self, collection: str) -> str:
        return f"milvus://{self.address}/{collection}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


class GivenMilvus:
    """A Milvus server the person running the tests started (``ASCENSION_TEST_MILVUS=HOST:PORT``,
    a standalone or a cluster): the catalogue suite runs against it instead of Milvus Lite."""

    def __init__(self, address: str):
        self.address, self.run = address, uuid.uuid4().hex[:8]  # apart from earlier runs'

    def location(self, collection: str) -> str:
        return f"milvus://{self.address}/{collection}_{self.run}"

    def stop(self) -> None:
        """Not ours to stop."""


class Place:
    """A test's catalogues, by name, on one store: ``place("cat")`` is the location to give
    a command (the same location for the same name), ``place.shared`` the options that build
    one there (``--shared DIR`` on Milvus), ``place.options`` the same for the Python API."""

    def __init__(self, kind: str, root: Path, server: Milvus | GivenMilvus | None = None):
        self.kind, self.root, self.server = kind, root, server
        self._names: dict[str, str] = {}

    def __call__(self, name: str = "cat") -> str:
        if self.kind == "folder":
            return str(self.root / name)
        if name not in self._names:  # one server for the session: names made unique
            self._names[name] = self.server.location(f"{name}_{uuid.uuid4().hex[:12]}")
        return self._names[name]

    @property
    def folder(self) -> bool:
        return self.kind == "folder"

    @property
    def shared(self) -> list[str]:
        return [] if self.folder else ["--shared", str(self.root / "shared")]

    @property
    def options(self) -> dict:
        return {} if self.folder else {"shared": self.root / "shared"}

    def __repr__(self) -> str:
        return self.kind
