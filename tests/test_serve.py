"""`ascension serve` against a real uvicorn server on 127.0.0.1, and its page in Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
requests = pytest.importorskip("requests")

from typer.testing import CliRunner  # noqa: E402

from ascension_cli.catalog_layout import CATALOG_VERSION  # noqa: E402
from ascension_cli.cli.app import app  # noqa: E402
from tests.conftest import CLI, chromium  # noqa: E402
from tests.test_catalog import train_tiny  # noqa: E402

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 90) -> None:
    """Wait until the server at ``url`` answers /healthz (``process`` serving it must live)."""
    deadline = time.time() + seconds
    while True:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.time() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.2)


class Server:
    """A real uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, catalog: Path, **options):
        import uvicorn

        from ascension_cli.serve.app import create_app

        settings = dict(run_options={"workers": 0, "precision": "auto", "device": "cpu",
                                     "channels_last": True, "batch_size": 64},
                        max_pixels=100_000_000, max_upload_bytes=5_000_000)
        settings.update(options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(catalog, **settings), host="127.0.0.1",
                                port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def catalogue_server(root: Path, **options) -> tuple[Path, Path, Server]:
    """A tiny trained model, its catalogue in root/cat, and a server over it."""
    data, checkpoint = train_tiny(root)
    result = runner.invoke(app, ["index", str(checkpoint), str(data), "-o", str(root / "cat"),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    return data, checkpoint, Server(root / "cat", **options)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data, checkpoint, server = catalogue_server(root, batch_window=0.05)
    yield root, data, checkpoint, server
    server.stop()


def post(server: Server, *images: Path, timeout: float = 60, **form) -> requests.Response:
    files = [("image", (path.name, path.read_bytes())) for path in images]
    return requests.post(server.url + "/search", files=files, data=form, timeout=timeout)


def test_health_info_and_the_answer_search_gives(served, tmp_path):
    root, data, _, server = served
    assert requests.get(server.url + "/healthz", timeout=10).json() == {"status": "ok"}
    info = requests.get(server.url + "/info", timeout=10).json()
    assert info["items"] == 32 and info["classes"] == 4 and info["feature_kind"] == "backbone"
    assert info["catalog_version"] == CATALOG_VERSION and info["dimension"] > 0

    query = data / "triangle" / "003.png"
    answer = post(server, query, k="3").json()
    assert answer["k"] == 3 and answer["waited_ms"] >= 0
    result = runner.invoke(app, ["search", str(root / "cat"), str(query), "--k", "3", "--json",
                                 str(tmp_path / "r.json"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    expected = json.loads((tmp_path / "r.json").read_text())["results"][0]
    served_result = answer["results"][0]
    assert served_result["predicted"] == expected["predicted"] == "triangle"
    assert [m["id"] for m in served_result["matches"]] == [m["id"] for m in expected["matches"]]
    for mine, theirs in zip(served_result["matches"], expected["matches"], strict=True):
        assert mine["similarity"] == pytest.approx(theirs["similarity"], abs=1e-5)

    image = requests.get(server.url + f"/items/{served_result['matches'][0]['id']}/image",
                         timeout=10)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(image.content, np.uint8), cv2.IMREAD_COLOR) is not None


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(served):
    _, data, _, server = served
    queries = sorted(data.rglob("*.png"))[:12]
    alone = {q.name + q.parent.name: post(server, q).json()["results"][0]["matches"]
             for q in queries[:3]}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda q: post(server, q).json(), queries))
    for query, answer in zip(queries, answers, strict=True):
        assert len(answer["results"]) == 1 and answer["results"][0]["query"] == query.name
        key = query.name + query.parent.name
        if key in alone:
            assert [m["id"] for m in answer["results"][0]["matches"]] == [
                m["id"] for m in alone[key]]
    assert max(answer["waited_ms"] for answer in answers) > 0
    several = post(server, *queries[:3]).json()
    assert [r["query"] for r in several["results"]] == [q.name for q in queries[:3]]


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("files", "form", "status", "says"), [
    ([("image", ("notes.jpg", b"not an image at all"))], {}, 400, "notes.jpg"),
    ([("image", ("bomb.png", bomb_png()))], {}, 400, "bomb.png"),
    ([("image", ("big.jpg", b"x" * 6_000_000))], {}, 413, "over the limit"),
    ([], {"k": "5"}, 400, "no image"),
    ([("image", ("a.png", b""))], {"k": "0"}, 400, "k must be"),
    ([("image", ("a.png", b""))], {"k": "many"}, 400, "whole number"),
    ([("image", ("a.png", b""))], {"threshold": "2"}, 400, "threshold must be"),
])
def test_bad_requests_get_a_4xx_json_error_and_the_service_stays_up(served, files, form, status,
                                                                  says):
    server = served[3]
    response = requests.post(server.url + "/search", files=files or None,
                             data=form or {"k": "5"}, timeout=60)
    assert response.status_code == status
    assert says in response.json()["error"]
    assert requests.get(server.url + "/item/0", timeout=10).status_code == 404
    assert requests.get(server.url + "/items/99999/image", timeout=10).status_code == 404
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_a_catalogue_changed_underneath_is_read_again(tmp_path):
    data, checkpoint = train_tiny(tmp_path)
    part = tmp_path / "part"
    for name in ("circle", "cross"):
        shutil.copytree(data / name, part / name)
    assert runner.invoke(app, ["index", str(checkpoint), str(part), "-o", str(tmp_path / "cat"),
                               "--workers", "0"]).exit_code == 0
    server = Server(tmp_path / "cat")
    try:
        assert requests.get(server.url + "/info", timeout=10).json()["items"] == 16
        shutil.copytree(data / "square", part / "square")
        assert runner.invoke(app, ["index", str(checkpoint), str(part), "-o",
                                   str(tmp_path / "cat"), "--add", "--workers", "0"]
                             ).exit_code == 0
        assert requests.get(server.url + "/info", timeout=10).json()["items"] == 24
        answer = post(server, data / "square" / "001.png").json()
        assert answer["results"][0]["predicted"] == "square"
    finally:
        server.stop()


def test_serve_without_its_extra_is_one_line(served, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = runner.invoke(app, ["serve", str(served[0] / "cat")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        'error: serve needs uvicorn, which is not installed: pip install "ascension-cli[serve]"']


def test_serve_on_a_device_this_machine_lacks_is_one_line_before_serving(served):
    import torch

    from ascension_cli.errors import ConfigError
    from ascension_cli.serve.app import create_app

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is usable here")
    result = runner.invoke(app, ["serve", str(served[0] / "cat"), "--device", "cuda",
                                 "--port", str(free_port())])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        "error: --device cuda: no CUDA device is available here; use --device cpu"]
    with pytest.raises(ConfigError):  # the app itself (a worker process) refuses it too
        create_app(served[0] / "cat", {"device": "cuda", "workers": 0}, max_pixels=10**6,
                   max_upload_bytes=10**6)


class Browser:
    """Headless Chromium driven over the DevTools protocol (what Puppeteer does, in 40 lines)."""

    def __init__(self, executable: str, tmp_path: Path):
        from websockets.sync.client import connect

        port = free_port()
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1000,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, targets = time.time() + 30, []
        while time.time() < deadline and not targets:
            try:
                targets = [t for t in requests.get(f"http://127.0.0.1:{port}/json",
                                                   timeout=2).json() if t["type"] == "page"]
            except requests.ConnectionError:
                time.sleep(0.2)
        self.stack = ExitStack()
        self.socket = self.stack.enter_context(
            connect(targets[0]["webSocketDebuggerUrl"], max_size=None))
        self.next_id, self.problems = 0, []
        for domain in ("Page", "Runtime", "Log", "DOM"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.problems.append(params["exceptionDetails"].get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            self.problems.append(str(params.get("args")))
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            self.problems.append(params["entry"].get("text"))

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.stack.close()
        self.process.kill()
        self.process.wait()


def page_answers(browser: Browser, server: Server, photo: Path) -> None:
    """Open the page, give it ``photo`` as a user would, and wait for its answer."""
    browser.call("Page.navigate", url=server.url + "/")
    deadline = time.time() + 30
    while "items in" not in (browser.evaluate("document.getElementById('info')"
                                              ".textContent") or ""):
        assert time.time() < deadline, "the page never showed the catalogue"
        time.sleep(0.2)
    node = browser.call("DOM.querySelector", selector="#photo",
                        nodeId=browser.call("DOM.getDocument")["root"]["nodeId"])["nodeId"]
    browser.call("DOM.setFileInputFiles", files=[str(photo)], nodeId=node)
    while browser.evaluate("document.body.dataset.answered") != "yes":
        assert time.time() < deadline + 30, "no answer appeared"
        time.sleep(0.2)
    time.sleep(0.5)  # the thumbnails load


def test_the_page_answers_a_photo_in_a_real_browser(served, tmp_path):
    executable = chromium()
    _, data, _, server = served
    browser = Browser(executable, tmp_path)
    try:
        page_answers(browser, server, data / "cross" / "002.png")
        assert browser.evaluate("document.getElementById('predicted').textContent") == "cross"
        shown = browser.evaluate("[...document.querySelectorAll('.match img')]"
                                 ".filter(i => i.complete && i.naturalWidth > 0).length")
        assert shown == 5
        picture = browser.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(picture))
        assert (tmp_path / "page.png").stat().st_size > 10_000
        assert browser.problems == []
    finally:
        browser.close()


def test_the_page_says_not_in_the_catalogue_under_the_calibrated_threshold(served, tmp_path):
    from ascension_cli.catalog.store import load_catalog, write_calibration

    executable = chromium()
    root, data, _, _ = served
    shutil.copytree(root / "cat", tmp_path / "cat")
    write_calibration(load_catalog(tmp_path / "cat"), {"threshold": 0.99, "target_fmr": 0.01})
    # A photo the catalogue does not hold: a cross turned upside down and recoloured.
    photo = tmp_path / "stranger.png"
    cv2.imwrite(str(photo), 255 - cv2.flip(cv2.imread(str(data / "cross" / "002.png")), 0))
    server = Server(tmp_path / "cat")
    browser = Browser(executable, tmp_path)
    try:
        answer = post(server, photo).json()
        assert answer["threshold"] == 0.99 and answer["results"][0]["unknown"]
        page_answers(browser, server, photo)
        verdict = browser.evaluate("document.getElementById('predicted').textContent")
        assert verdict == "not in the catalogue"
        assert "the threshold 0.990" in browser.evaluate(
            "document.getElementById('score').textContent")
        picture = browser.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "unknown.png").write_bytes(base64.b64decode(picture))
        keep = os.environ.get("ASCENSION_KEEP_SCREENSHOTS")
        if keep:
            shutil.copy(tmp_path / "unknown.png", Path(keep) / "unknown.png")
        assert browser.problems == []
    finally:
        browser.close()
        server.stop()


def test_writes_need_the_token_and_land_atomically(tmp_path):
    data, checkpoint = train_tiny(tmp_path)
    assert runner.invoke(app, ["index", str(checkpoint), str(data / "circle"), "-o",
                               str(tmp_path / "cat"), "--workers", "0"]).exit_code == 0
    closed = Server(tmp_path / "cat")
    try:
        photo = data / "cross" / "001.png"
        files = [("image", (photo.name, photo.read_bytes()))]
        refused = requests.post(closed.url + "/items", files=files, data={"label": "cross"},
                                timeout=30)
        assert refused.status_code == 403 and "writes are off" in refused.json()["error"]
    finally:
        closed.stop()
    server = Server(tmp_path / "cat", token="a-long-enough-secret")
    try:
        def add(label, secret="a-long-enough-secret"):
            return requests.post(server.url + "/items", files=files, data={"label": label},
                                 headers={"Authorization": f"Bearer {secret}"}, timeout=60)

        assert add("cross", secret="guess").status_code == 401
        assert add("../escape").status_code == 400
        before = requests.get(server.url + "/info", timeout=10).json()["items"]
        answer = add("cross")
        assert answer.status_code == 200 and answer.json()["added"] == 1
        assert requests.get(server.url + "/info", timeout=10).json()["items"] == before + 1
        found = post(server, photo, k="1").json()["results"][0]
        assert found["predicted"] == "cross" and found["matches"][0]["similarity"] > 0.999
        digest = hashlib.sha256(photo.read_bytes()).hexdigest()  # kept inside, by its digest
        assert (tmp_path / "cat" / "photos" / digest[:2] / f"{digest}.png").is_file()
        # The same photo filed again under another label: confusable with "cross", said so.
        again = add("plus").json()
        assert again["confusable"] and again["confusable"][0]["nearest_item"] == "cross"
        assert again["nearest"][0]["similarity"] > 0.999 and again["nearest"][0]["item"] == "plus"
        assert not list((tmp_path / "cat").glob(".*.tmp"))  # no temp file left behind
    finally:
        server.stop()


def test_search_names_the_item_and_groups_by_item(served):
    _, data, _, server = served
    query = data / "circle" / "001.png"
    by_photo = post(server, query, k="5").json()
    assert by_photo["group_by"] == "photo"
    first = by_photo["results"][0]
    assert first["item"] == first["matches"][0]["item"] == first["matches"][0]["class"]
    by_item = post(server, query, k="3", group_by="item").json()
    items = [m["item"] for m in by_item["results"][0]["matches"]]
    assert by_item["group_by"] == "item" and len(items) == len(set(items)) == 3
    wrong = post(server, query, group_by="sku")
    assert wrong.status_code == 400 and "group_by" in wrong.json()["error"]


def test_several_server_processes_answer(served):
    root, data, _, _ = served
    port = free_port()
    process = subprocess.Popen(
        [*CLI, "serve", str(root / "cat"), "--port", str(port), "--workers", "2",
         "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        answers = [requests.post(url + "/search", files=[("image", ("q.png", (
            data / "square" / "002.png").read_bytes()))], data={"k": "1"}, timeout=60).json()
            for _ in range(4)]
        assert {a["results"][0]["predicted"] for a in answers} == {"square"}
    finally:
        process.terminate()
        process.wait(timeout=30)


def _resolved(schema: dict, spec: dict) -> dict:
    """``schema`` with a ``$ref`` into the document's components followed."""
    reference = schema.get("$ref")
    return spec["components"]["schemas"][reference.rsplit("/", 1)[-1]] if reference else schema


def test_the_openapi_schema_describes_search_and_a_request_made_from_it_is_answered(served):
    from ascension_cli.serve.schemas import InfoAnswer, SearchAnswer

    _, data, _, server = served
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    search_spec = spec["paths"]["/search"]["post"]
    form = search_spec["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "k", "threshold", "group_by"} <= set(form["properties"])
    answer = _resolved(search_spec["responses"]["200"]["content"]["application/json"]["schema"],
                       spec)
    assert {"k", "threshold", "group_by", "waited_ms", "results"} <= set(answer["properties"])
    assert "multipart/form-data" in spec["paths"]["/items"]["post"]["requestBody"]["content"]
    assert "503" in spec["paths"]["/info"]["get"]["responses"]

    # A request made from the schema alone: binary fields get a photo, the rest their default.
    files, fields = [], {}
    for name, field in form["properties"].items():
        if field.get("type") == "array" and field["items"].get("format") == "binary":
            files.append((name, ("q.png", (data / "circle" / "001.png").read_bytes())))
        elif field.get("default") is not None:
            fields[name] = str(field["default"])
    response = requests.post(server.url + "/search", files=files, data=fields, timeout=60)
    assert response.status_code == 200, response.text
    parsed = SearchAnswer.model_validate(response.json())  # the answer is what it promises
    assert len(parsed.results) == 1 and len(parsed.results[0].matches) == int(fields["k"])
    InfoAnswer.model_validate(requests.get(server.url + "/info", timeout=10).json())
