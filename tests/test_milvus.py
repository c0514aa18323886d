"""A catalogue in a Milvus collection, against a real Milvus Lite gRPC server on 127.0.0.1 at a
free port: the same commands as on a folder give the same answers (flat search), writes are
idempotent, two readers see a write at once, and a server that is down is one line, in bounded
time, with no credential in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from ascension_cli import api  # noqa: E402
from ascension_cli.catalog.store import load_catalog  # noqa: E402
from ascension_cli.cli.app import app  # noqa: E402
from tests.stores import GivenMilvus, Milvus, free_port  # noqa: E402
from tests.test_catalog import train_tiny  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def milvus(milvus_server):
    """The session's Milvus server (``conftest.py``; ``ASCENSION_TEST_MILVUS`` names another)."""
    return milvus_server


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("milvus-model"))


def one_class(data: Path, name: str, root: Path) -> Path:
    """A gallery of one class folder of ``data``."""
    shutil.copytree(data / name, root / "gallery" / name)
    return root / "gallery"


def cli(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def answers(catalog, queries: list[Path]) -> list:
    return [(r.predicted, [(m.path, m.class_name, m.item, round(m.similarity, 4))
                           for m in r.matches])
            for r in api.search(catalog, queries, k=5, workers=0)]


def test_the_same_commands_give_the_same_answers_on_a_folder_and_on_milvus(
        milvus, trained, tmp_path):
    data, checkpoint = trained
    folder, collection = tmp_path / "cat", milvus.location("shop")
    cli("index", checkpoint, data, "-o", folder, "--workers", "0")
    cli("index", checkpoint, data, "-o", collection, "--shared", tmp_path / "shared",
        "--workers", "0")
    queries = [data / "circle" / "001.png", data / "square" / "004.png",
               data / "cross" / "006.png"]
    assert answers(collection, queries) == answers(folder, queries)
    assert len(load_catalog(collection)) == 32
    served = load_catalog(collection, with_vectors=False)  # what a service holds: no vectors
    assert served.vectors is None and served.with_vectors().vectors.shape == (32, served.dim)
    # The photos and the model are in the shared store, named by their digests.
    assert len(list((tmp_path / "shared" / "photos").rglob("*.png"))) == 32
    assert list((tmp_path / "shared" / "models").glob("*.pt"))

    photo = (data / "circle" / "002.png").resolve().as_posix()
    for where in (folder, collection):
        cli("catalog", "remove", where, "--photo", photo, "--item", "cross")
        cli("catalog", "relabel", where, "--item", "triangle", "--class", "circle")
    assert answers(collection, queries) == answers(folder, queries)
    assert [e["action"] for e in api.history(collection)] == ["build", "remove", "relabel"]
    out = cli("search", collection, queries[0], "--workers", "0")
    assert "circle" in out


def test_writes_are_idempotent_and_seen_by_every_reader(milvus, trained, tmp_path):
    from ascension_cli.catalog.milvus_store import MilvusStore

    data, checkpoint = trained
    location = milvus.location("twice")
    cli("index", checkpoint, one_class(data, "circle", tmp_path), "-o", location, "--shared",
        tmp_path / "s", "--workers", "0")
    extra = tmp_path / "extra" / "square"
    shutil.copytree(data / "square", extra)
    for _ in range(2):  # the same add again (as after a crash): nothing twice
        cli("index", checkpoint, tmp_path / "extra", "-o", location, "--add", "--workers", "0")
    assert len(load_catalog(location)) == 16
    reader = MilvusStore(location)  # another service's view of the same collection
    before = reader.stamp()
    # One connection a process: a client a read would pile up channels pinging the server.
    assert reader.client() is MilvusStore(location).client()
    api.remove(location, items=["square"])
    assert reader.stamp() != before and len(reader.read()) == 8  # the next read sees it


@pytest.fixture
def own_servers(monkeypatch):
    """Start Milvus Lite servers of the test's own (spoken to without TLS or a credential,
    whatever ASCENSION_TEST_MILVUS's server needs), each stopped when the test ends, whatever
    happened in it."""
    for variable in ("ASCENSION_MILVUS_TLS", "ASCENSION_MILVUS_TOKEN", "ASCENSION_MILVUS_CERT",
                     "ASCENSION_MILVUS_KEY", "ASCENSION_MILVUS_TOKEN_FILE"):
        monkeypatch.delenv(variable, raising=False)
    started: list[Milvus] = []

    def start(data: Path, port: int | None = None) -> Milvus:
        started.append(Milvus(data, port))
        return started[-1]

    yield start
    for server in started:
        if server.process.poll() is None:
            server.stop()


def test_a_server_that_is_down_is_one_line_in_bounded_time_without_the_token(
        trained, tmp_path, monkeypatch, own_servers):
    data, checkpoint = trained
    server = own_servers(tmp_path / "data")
    location = server.location("gone")
    cli("index", checkpoint, one_class(data, "circle", tmp_path), "-o", location, "--shared",
        tmp_path / "s",
        "--workers", "0")
    server.stop()
    monkeypatch.setenv("ASCENSION_MILVUS_TOKEN", "root:very-secret-password")
    started = time.perf_counter()
    result = runner.invoke(app, ["search", location, str(data / "circle" / "001.png"),
                                 "--workers", "0"])
    assert time.perf_counter() - started < 60
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "cannot be read now" in result.output and "very-secret" not in result.output
    bad = runner.invoke(app, ["search", "milvus://127.0.0.1:99999/x", str(data)])
    assert bad.exit_code == 2 and "not a Milvus catalogue's location" in bad.output
    os.environ.pop("ASCENSION_MILVUS_TOKEN", None)


def test_two_services_answer_from_one_collection_and_see_each_others_writes(
        milvus, trained, tmp_path):
    pytest.importorskip("fastapi")
    import requests

    from tests.test_serve import Server, post

    data, checkpoint = trained
    location = milvus.location("chain")
    cli("index", checkpoint, one_class(data, "circle", tmp_path), "-o", location, "--shared",
        tmp_path / "s",
        "--workers", "0")
    one = Server(location, token="a-long-enough-secret", token_name="shop-1")
    two = Server(location)
    try:
        photo = data / "square" / "001.png"
        assert post(two, photo, k="1").json()["results"][0]["predicted"] == "circle"
        added = requests.post(one.url + "/items", files=[("image", ("p.png", photo.read_bytes()))],
                              data={"label": "square"}, timeout=60,
                              headers={"Authorization": "Bearer a-long-enough-secret"})
        assert added.status_code == 200, added.text
        found = post(two, photo, k="1").json()["results"][0]  # the other service, at once
        assert found["predicted"] == "square" and found["matches"][0]["similarity"] > 0.999
        info = requests.get(two.url + "/info", timeout=10).json()
        assert info["history"]["last"][0]["by"] == "token:shop-1"
        assert info["catalog"] == location
    finally:
        one.stop()
        two.stop()


def test_the_service_answers_503_while_milvus_is_down_and_recovers(trained, tmp_path,
                                                                   own_servers):
    pytest.importorskip("fastapi")
    from tests.test_serve import Server, post

    data, checkpoint = trained
    database = own_servers(tmp_path / "data")
    location = database.location("restarts")
    cli("index", checkpoint, one_class(data, "circle", tmp_path), "-o", location, "--shared",
        tmp_path / "s",
        "--workers", "0")
    service = Server(location)
    photo = data / "circle" / "003.png"
    try:
        assert post(service, photo, k="1").status_code == 200
        database.stop()
        started = time.perf_counter()
        down = post(service, photo, k="1")
        assert down.status_code == 503 and "error" in down.json()
        assert time.perf_counter() - started < 45
        database = own_servers(tmp_path / "data", port=database.port)  # back, same data
        deadline = time.time() + 60  # the service connects again by itself, at a request
        while (back := post(service, photo, k="1")).status_code == 503 and (
                time.time() < deadline):
            time.sleep(1)
        assert back.status_code == 200 and back.json()["results"][0]["predicted"] == "circle"
    finally:
        service.stop()
        database.stop()


def test_calibrate_and_check_give_what_they_give_on_a_folder(milvus, trained, tmp_path):
    from tests.test_calibrate import split_photos

    data, checkpoint = trained
    known, held = split_photos(data, tmp_path)
    folder, collection = tmp_path / "cat", milvus.location("calibrated")
    cli("index", checkpoint, known, "-o", folder, "--workers", "0")
    cli("index", checkpoint, known, "-o", collection, "--shared", tmp_path / "s",
        "--workers", "0")
    for where in (folder, collection):
        cli("calibrate", where, held, "--target-fmr", "0.25", "--workers", "0")
        cli("index", "--check", "-o", where, "--json", tmp_path / f"{where == folder}.json")
    on_folder, on_milvus = load_catalog(folder).calibration, load_catalog(collection).calibration
    assert on_milvus["threshold"] == pytest.approx(on_folder["threshold"], abs=1e-5)
    assert on_milvus["fnmr"] == on_folder["fnmr"] and on_milvus["fmr"] == on_folder["fmr"]
    assert api.history(collection)[-1]["action"] == "calibrate"
    import json

    checks = [json.loads((tmp_path / f"{flag}.json").read_text())["check"]
              for flag in (True, False)]
    assert [len(c["suspected_label_errors"]) for c in checks] == [
        len(checks[0]["suspected_label_errors"])] * 2
    assert [len(c["confusable_items"]) for c in checks] == [len(checks[0]["confusable_items"])] * 2


def test_the_server_index_follows_kind_and_its_limits_are_one_line(milvus, trained, tmp_path):
    data, checkpoint = trained
    location = milvus.location("graph")
    cli("index", checkpoint, data, "-o", location, "--shared", tmp_path / "s", "--kind", "hnsw",
        "--workers", "0")
    found = load_catalog(location)
    assert found.index["type"] == "HNSW" and found.index["search"] == {"ef": 128}
    query = data / "circle" / "001.png"
    assert api.search(location, [query], k=1, workers=0)[0].matches[0].similarity > 0.999
    result = runner.invoke(app, ["index", str(checkpoint), str(data), "-o",
                                 milvus.location("compressed"), "--shared", str(tmp_path / "s"),
                                 "--kind", "ivfpq", "--workers", "0"])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "ivfpq" in result.output and len(result.output.strip().splitlines()) == 1
    # DISKANN: a server's index (its graph's parameters the server's own), not FAISS's; Milvus
    # Lite builds no DISKANN (nor IVF_PQ): refused there before anything is made.
    disk = milvus.location("disk")
    built = runner.invoke(app, ["index", str(checkpoint), str(data), "-o", disk, "--shared",
                                str(tmp_path / "s"), "--kind", "diskann", "--workers", "0"])
    if isinstance(milvus, GivenMilvus):  # a server you started (ASCENSION_TEST_MILVUS)
        assert built.exit_code == 0, built.output
        assert load_catalog(disk).index["type"] == "DISKANN"
        assert api.search(disk, [query], k=40, workers=0)[0].matches[0].similarity > 0.999
    else:
        assert built.exit_code == 2 and "Milvus Lite" in built.output, built.output
        assert "has no DISKANN index" in built.output and "Traceback" not in built.output
        assert "holds no catalogue" in runner.invoke(app, ["search", disk, str(query)]).output
    folder = runner.invoke(app, ["index", str(checkpoint), str(data), "-o",
                                 str(tmp_path / "cat"), "--kind", "diskann", "--workers", "0"])
    assert folder.exit_code == 2 and "index of a Milvus server" in folder.output


def test_a_photo_is_replaced_in_a_collection_as_in_a_folder(milvus, trained, tmp_path):
    data, checkpoint = trained
    folder, collection = tmp_path / "cat", milvus.location("replaced")
    cli("index", checkpoint, data, "-o", folder, "--workers", "0")
    cli("index", checkpoint, data, "-o", collection, "--shared", tmp_path / "s",
        "--workers", "0")
    old = (data / "circle" / "005.png").resolve().as_posix()
    new = tmp_path / "better.png"  # a photo neither holds: no tie between equal photos
    import cv2

    cv2.imwrite(str(new), cv2.flip(cv2.imread(str(data / "square" / "007.png")), 1))
    for where in (folder, collection):
        cli("catalog", "replace", where, old, new, "--workers", "0")
    queries = [new, data / "circle" / "001.png"]
    assert answers(collection, queries) == answers(folder, queries)
    assert len(load_catalog(collection)) == 32


def test_an_upgrade_moves_the_alias_and_a_rollback_moves_it_back(milvus, tmp_path):
    from tests.test_calibrate import split_photos
    from tests.test_catalog_upgrade import checkpoint

    data = tmp_path / "data"
    from tests.conftest import make_dataset

    make_dataset(data, classes=4, per_class=8)
    current = checkpoint(tmp_path, data, "current", 2)
    longer = checkpoint(tmp_path, data, "longer", 6)
    known, held = split_photos(data, tmp_path)
    location = milvus.location("upgraded")
    cli("index", current, known, "-o", location, "--shared", tmp_path / "s", "--workers", "0")
    cli("calibrate", location, held, "--target-fmr", "0.25", "--workers", "0")
    queries = sorted(held.glob("*/*.png"))[:5]
    before = answers(location, queries)
    out = cli("catalog", "upgrade", location, longer, "--workers", "0")
    assert "new model: Recall@1" in out
    assert answers(location, queries) != before
    client = load_catalog(location).backend.client()
    alias = location.rsplit("/", 1)[1]
    assert client.describe_alias(alias)["collection_name"] == f"{alias}__2"
    cli("catalog", "rollback", location)
    assert answers(location, queries) == before  # the generation kept, untouched
    assert client.describe_alias(alias)["collection_name"] == f"{alias}__1"
    assert [e["action"] for e in api.history(location)][-2:] == ["upgrade", "rollback"]
    assert "nothing to roll back" in runner.invoke(app, ["catalog", "rollback", location]).output


class Service:
    """`ascension serve` on a Milvus catalogue, in its own process on 127.0.0.1."""

    def __init__(self, location: str, *options: str):
        import requests

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ascension_cli", "serve", location, "--port", str(self.port),
             "--device", "cpu", *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError("the service did not start")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def test_two_service_processes_a_writer_killed_mid_add_and_the_retry(milvus, trained,
                                                                     tmp_path):
    pytest.importorskip("fastapi")
    import threading

    import requests

    data, checkpoint = trained
    location = milvus.location("processes")
    cli("index", checkpoint, one_class(data, "circle", tmp_path), "-o", location, "--shared",
        tmp_path / "s", "--workers", "0")
    token = ("--allow-writes", "--token", "a-long-enough-secret")
    reader = Service(location, *token)
    photos = sorted((data / "square").glob("*.png"))[:3]
    files = [("image", (p.name, p.read_bytes())) for p in photos]
    headers = {"Authorization": "Bearer a-long-enough-secret"}
    try:
        for life, pause in enumerate((0.05, 0.3, 0.8)):
            writer = Service(location, *token)
            thread = threading.Thread(target=lambda w=writer: _quietly(
                requests.post, w.url + "/items", files=files, data={"label": "square"},
                headers=headers, timeout=60))
            thread.start()
            time.sleep(pause)
            writer.kill()  # kill -9, wherever the add stands
            thread.join(timeout=60)
            retried = requests.post(reader.url + "/items", files=files, headers=headers,
                                    data={"label": "square"}, timeout=60)
            assert retried.status_code == 200, retried.text
            found = load_catalog(location, with_vectors=False)
            squares = [row for row in range(len(found))
                       if found.class_name(int(found.labels[row])) == "square"]
            assert len(squares) == len(photos), f"life {life}: {len(squares)} square rows"
            answer = requests.post(reader.url + "/search", timeout=60,
                                   files=[("image", (photos[0].name, photos[0].read_bytes()))],
                                   data={"k": "1"}).json()["results"][0]
            assert answer["predicted"] == "square"
    finally:
        reader.kill()


def _quietly(call, *args, **kwargs) -> None:
    import contextlib

    with contextlib.suppress(Exception):  # the service is killed under it
        call(*args, **kwargs)


def test_credentials_and_tls_come_from_the_environment_and_are_never_said(tmp_path):
    from ascension_cli.catalog.milvus_connection import connection_options
    from ascension_cli.errors import ConfigError

    assert connection_options("db", 19530, {}) == {"uri": "http://db:19530", "token": ""}
    secret = tmp_path / "token"
    secret.write_text("root:hunter2-secret\n")
    given = connection_options("db", 1, {"ASCENSION_MILVUS_TOKEN_FILE": str(secret)})
    assert given["token"] == "root:hunter2-secret"
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    tls = connection_options("db", 1, {"ASCENSION_MILVUS_TLS": str(ca)})
    assert tls["uri"] == "https://db:1" and tls["secure"] and tls["server_pem_path"] == str(ca)
    system = connection_options("db", 1, {"ASCENSION_MILVUS_TLS": "1"})
    assert system["secure"] and "server_pem_path" not in system
    mutual = connection_options("db", 1, {"ASCENSION_MILVUS_TLS": str(ca),
                                          "ASCENSION_MILVUS_CERT": str(ca),
                                          "ASCENSION_MILVUS_KEY": str(secret)})
    assert mutual["ca_pem_path"] == str(ca) and mutual["client_key_path"] == str(secret)
    for environ, words in (
            ({"ASCENSION_MILVUS_TOKEN_FILE": str(secret)}, "not both"),
            ({"ASCENSION_MILVUS_CERT": str(ca)}, "set ASCENSION_MILVUS_TLS too"),
            ({"ASCENSION_MILVUS_TLS": "1", "ASCENSION_MILVUS_CERT": str(ca),
              "ASCENSION_MILVUS_KEY": str(ca)}, "to name the authority's PEM"),
            ({"ASCENSION_MILVUS_TLS": str(ca), "ASCENSION_MILVUS_CERT": str(ca)}, "needs both")):
        with pytest.raises(ConfigError, match=words) as error:
            connection_options("db", 1, {"ASCENSION_MILVUS_TOKEN": "root:hunter2-secret",
                                         **environ})
        assert "hunter2" not in str(error.value)
    with pytest.raises(ConfigError, match="names no readable file"):
        connection_options("db", 1, {"ASCENSION_MILVUS_TOKEN_FILE": str(tmp_path / "none")})


def test_a_bad_tls_setting_is_one_line_before_any_connection(trained, tmp_path, monkeypatch):
    data, _ = trained
    monkeypatch.setenv("ASCENSION_MILVUS_TLS", str(tmp_path / "missing-ca.pem"))
    result = runner.invoke(app, ["search", "milvus://127.0.0.1:1/shop",
                                 str(data / "circle" / "001.png"), "--workers", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: ASCENSION_MILVUS_TLS names no readable file")


def test_a_service_machine_reads_the_shared_store_over_http_or_elsewhere(
        milvus, trained, tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    from ascension_cli.errors import CatalogError

    data, checkpoint = trained
    location = milvus.location("remote")
    store = tmp_path / "store"
    cli("index", checkpoint, one_class(data, "circle", tmp_path), "-o", location, "--shared",
        store, "--workers", "0")
    query = data / "circle" / "001.png"
    expected = answers(location, [query])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(Quiet, directory=str(store)))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("ASCENSION_MILVUS_SHARED",
                           f"http://reader:pa55word@127.0.0.1:{web.server_port}/")
        monkeypatch.setenv("ASCENSION_CACHE", str(tmp_path / "cache"))
        found = load_catalog(location, with_vectors=False)
        assert found.directory.is_relative_to(tmp_path / "cache")  # fetched, checked, cached
        assert answers(location, [query]) == expected
        # Over HTTP the store is read-only: a change that keeps photos is refused in one line.
        extra = tmp_path / "extra" / "square"
        shutil.copytree(data / "square", extra)
        refused = runner.invoke(app, ["index", str(checkpoint), str(extra.parent), "-o",
                                      location, "--add", "--workers", "0"])
        assert refused.exit_code != 0 and "read-only" in refused.output, refused.output
        # A model on the store that is not the catalogue's: one line, no password in it.
        shutil.rmtree(tmp_path / "cache")
        original = (store / found.files["model"]).read_bytes()
        (store / found.files["model"]).write_bytes(b"not the model")
        with pytest.raises(CatalogError, match="sha256 differs") as error:
            load_catalog(location, with_vectors=False)
        assert "pa55word" not in str(error.value) and "reader" not in str(error.value)
        assert not list((tmp_path / "cache").rglob("*.pt"))  # nothing half-fetched kept
    finally:
        web.shutdown()
    # The same store mounted at another path on this machine.
    (store / found.files["model"]).write_bytes(original)
    moved = tmp_path / "mounted-elsewhere"
    shutil.move(store, moved)
    monkeypatch.setenv("ASCENSION_MILVUS_SHARED", str(moved))
    assert answers(location, [query]) == expected
    (moved / found.files["model"]).unlink()
    with pytest.raises(CatalogError, match="missing or not the one"):
        load_catalog(location, with_vectors=False)
