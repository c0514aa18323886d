"""The lookup service under hostile input: names, bytes, bombs of every format, streamed
uploads past the limit, headers and labels; each a 4xx JSON error or a correct answer, and the
event loop free throughout."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

from ascension_cli.cli.app import app  # noqa: E402, I001
from ascension_cli.serve.batching import Batcher, Pending  # noqa: E402
from ascension_cli.embedding.vectors import load_vectors  # noqa: E402
from tests.test_catalog import train_tiny  # noqa: E402
from tests.test_image_header import tiff_claiming, webp_claiming  # noqa: E402
from tests.test_serve import catalogue_server, runner  # noqa: E402

TOKEN = "a-long-enough-token"


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    data, _, server = catalogue_server(root, batch_window=0.02, token=TOKEN,
                                       max_upload_bytes=1_000_000)
    yield root, data, server
    server.stop()


def search(server, files, timeout=60, **form):
    return requests.post(server.url + "/search", files=files, data=form, timeout=timeout)


def add(server, files, label, token=TOKEN, headers=None):
    headers = headers or {"Authorization": f"Bearer {token}"}
    return requests.post(server.url + "/items", files=files, data={"label": label},
                         headers=headers, timeout=60)


@pytest.mark.parametrize("name", ["q." + "x" * 300, "a\x00b.png", "../../../etc/passwd.png",
                                  "é" * 400, "con", "", "q.png\r\nX-Injected: 1"],
                         ids=["300-char-extension", "nul-byte", "traversal", "400-accents",
                              "device-name", "empty", "crlf"])
def test_any_upload_name_is_only_echoed_never_a_path(shop, name):
    _, data, server = shop
    answer = search(server, [("image", (name, (data / "square" / "001.png").read_bytes()))])
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["predicted"] == "square" and len(result["query"]) <= 255


def test_one_failing_request_in_a_batch_fails_only_itself():
    class Lookup:
        def search(self, batch):
            if any(p.images[0][0] == "poison" for p in batch):
                raise RuntimeError("this request breaks the forward pass")
            return [[{"query": p.images[0][0]}] for p in batch]

    async def main():
        batcher = Batcher(Lookup(), window=0.05, max_images=32)
        names = ["a", "poison", "b", "c"]
        return await asyncio.gather(*(batcher.submit(Pending([(n, b"")], 5, None))
                                      for n in names), return_exceptions=True)

    answers = asyncio.run(main())
    assert isinstance(answers[1], RuntimeError)
    assert [a[0][0]["query"] for i, a in enumerate(answers) if i != 1] == ["a", "b", "c"]


def health_latencies(server, stop: threading.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.01)
    return latencies


def test_bombs_of_every_format_are_400_and_health_answers_while_batches_run(shop):
    _, _, server = shop
    bombs = [("image", (f"b{i}.webp", webp_claiming(12000, 12000))) for i in range(10)]
    large = cv2.imencode(".png", np.random.default_rng(0).integers(
        0, 255, (400, 400, 3), dtype=np.uint8))[1].tobytes()
    stop = threading.Event()
    with ThreadPoolExecutor(9) as pool:
        watcher = pool.submit(health_latencies, server, stop)
        refused = [pool.submit(search, server, bombs),
                   pool.submit(search, server, [("image", ("t.tif", tiff_claiming(11000, 11000)))])]
        heavy = [pool.submit(search, server, [("image", (f"{i}.png", large))] * 2)
                 for i in range(6)]
        answers = [f.result() for f in refused + heavy]
        stop.set()
        latencies = watcher.result()
    assert [a.status_code for a in answers[:2]] == [400, 400]
    assert "over the limit" in answers[0].json()["error"]
    assert all(a.status_code == 200 for a in answers[2:]), [a.text for a in answers[2:]]
    assert len(latencies) >= 3 and max(latencies) < 0.1, latencies


def raw_chunked_upload(port: int, total: int, chunk: int = 65536) -> tuple[bytes, int]:
    """POST /search with Transfer-Encoding: chunked (no Content-Length); stop sending as soon as
    the server answers. Returns (the answer's first bytes, how many body bytes were sent)."""
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode())
        body = head
        sock.setblocking(False)
        answer = b""
        while sent < total:
            piece = body + b"\0" * (chunk - len(body))
            body = b""
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            try:
                answer = sock.recv(4096)
                if answer:
                    break
            except BlockingIOError:
                pass
        sock.setblocking(True)
        return _rest_of(sock, answer), sent


def _rest_of(sock: socket.socket, answer: bytes) -> bytes:
    """The answer read on until its headers and Content-Length bytes of body are in."""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096) or b"\r\n\r\n"
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), b"0"))
    while len(body) < length:
        more = sock.recv(4096)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body



def test_a_chunked_upload_is_refused_as_soon_as_it_passes_the_limit(shop):
    _, _, server = shop
    answer, sent = raw_chunked_upload(server.port, total=50_000_000)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"over the limit" in answer
    # Refused while reading (the limit is 1 MB), not after the 50 MB. `sent` also counts what
    # the loopback's socket buffers took in before the answer came back: several MB (Linux
    # grows a receive buffer while the server reads; 5.4 MB was seen on a busy 2-core machine).
    assert sent < 15_000_000
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_hostile_writes_are_4xx_and_leave_no_orphans(shop):
    root, data, server = shop
    photo = (data / "circle" / "001.png").read_bytes()
    uploads = root / "cat" / "uploads"
    for label in ["\U0001f600" * 64, "bad\x01label", " padded", "..", "a/b", "x" * 201]:
        answer = add(server, [("image", ("p.png", photo))], label)
        assert answer.status_code == 400 and "label" in answer.json()["error"], label
    assert add(server, [("image", ("p.png", photo))], "ok",
               headers={"Authorization": "Bearer \u00e9\u00e8".encode().decode("latin-1")}
               ).status_code == 401
    stored = add(server, [("image", ("p." + "y" * 300, photo))], "\U0001f600" * 20)
    assert stored.status_code == 200 and stored.json()["added"] == 1, stored.text
    digest = hashlib.sha256(photo).hexdigest()  # kept by its digest, never the client's name
    assert (root / "cat" / "photos" / digest[:2] / f"{digest}.png").is_file()
    assert not list((root / "cat").rglob("*yyyy*")) and not uploads.exists()
    as_file = search(server, [("image", ("q.png", photo)), ("k", ("k.txt", b"5"))])
    assert as_file.status_code == 400 and "text field" in as_file.json()["error"]
    broken = requests.post(server.url + "/search", data=b"--x\r\nnot a form",
                           headers={"Content-Type": "multipart/form-data; boundary=x"},
                           timeout=30)
    assert broken.status_code == 400 and "error" in broken.json()
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_a_bomb_in_a_class_folder_is_skipped_by_embed(tmp_path):
    data, checkpoint = train_tiny(tmp_path)
    (data / "square" / "bomb.tif").write_bytes(tiff_claiming(11000, 11000))
    (data / "square" / "bomb.webp").write_bytes(webp_claiming(12000, 12000))
    result = runner.invoke(app, ["embed", str(checkpoint), str(data), "-o",
                                 str(tmp_path / "v.npz"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.count("pixels is over the limit") == 2, result.output
    assert "2 unreadable image(s) skipped" in result.output
    assert sorted(load_vectors(tmp_path / "v.npz").failed) == ["square/bomb.tif",
                                                               "square/bomb.webp"]


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmRSS"))


def test_a_bounded_load_of_valid_bad_and_write_requests(tmp_path):
    """About 15 s of concurrent clients mixing valid searches, hostile requests and token adds
    against a real server on 127.0.0.1: every valid answer right, every bad one a 4xx, memory
    bounded, and the catalogue consistent afterwards."""
    from ascension_cli.catalog.store import load_catalog

    data, _, server = catalogue_server(tmp_path, batch_window=0.01, token=TOKEN,
                                       max_upload_bytes=1_000_000)
    photos = {name: (data / name / "003.png").read_bytes() for name in ("square", "circle")}
    bad = [[("image", ("x.txt", b"not an image"))], [("image", ("b.webp", webp_claiming(12000,
           12000)))], [("image", ("t.tif", tiff_claiming(11000, 11000)))],
           [("image", ("big.png", bytes(1_200_000)))], [("image", ("q." + "z" * 300,
           b"\x89PNG\r\n\x1a\n"))]]
    deadline = time.monotonic() + 15
    tally = {"valid": 0, "bad": 0, "added": 0, "wrong": []}
    lock = threading.Lock()
    before = rss_mib()

    def client(number: int) -> None:
        turn = 0
        while time.monotonic() < deadline:
            turn += 1
            kind = (number + turn) % 4
            if kind == 0:
                answer = add(server, [("image", ("n.png", photos["circle"]))], "circle")
                ok, key = answer.status_code == 200, "added"
            elif kind == 1:
                answer = search(server, bad[turn % len(bad)])
                ok, key = 400 <= answer.status_code < 500 and "error" in answer.json(), "bad"
            else:
                name = "square" if kind == 2 else "circle"
                answer = search(server, [("image", (f"{name}.png", photos[name]))], k="3")
                # A tiny model's classes are not reliable; the answer's shape is.
                results = answer.json().get("results", [{}]) if answer.ok else [{}]
                ok = (len(results) == 1 and results[0].get("query") == f"{name}.png"
                      and len(results[0].get("matches", [])) == 3)
                key = "valid"
            with lock:
                tally[key] += ok
                if not ok:
                    tally["wrong"].append((kind, answer.status_code, answer.text[:200]))

    try:
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(client, range(6)))
        assert not tally["wrong"], tally["wrong"][:5]
        assert tally["valid"] > 10 and tally["bad"] > 5 and tally["added"] > 2, tally
        assert rss_mib() - before < 600, (before, rss_mib())
        assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    finally:
        server.stop()
    catalogue = load_catalog(tmp_path / "cat")
    assert len(catalogue) == 32 + tally["added"]  # every add landed, once
    kept = {p.relative_to(tmp_path / "cat").as_posix()
            for p in (tmp_path / "cat" / "photos").rglob("*") if p.is_file()}
    assert kept == set(catalogue.stored)  # each photo it holds, kept once, and no other


def test_a_photo_between_the_default_limit_and_the_service_s_own_is_decoded_once_and_matched(
        tmp_path, monkeypatch):
    """--max-image-pixels above 100 M: a 100.02 M pixel photo is accepted and matched (it used
    to be decoded a second time under the default limit and dropped, answering 200 with no
    results), and each upload is decoded exactly once."""
    from ascension_cli.data import folder
    from ascension_cli.serve import lookup
    from tests.test_serve import Server

    root = tmp_path
    data, checkpoint = train_tiny(root)
    runner.invoke(app, ["index", str(checkpoint), str(data), "-o", str(root / "cat"),
                        "--workers", "0"])
    big = np.full((10_001, 10_001), 200, np.uint8)  # 100,020,001 pixels, a few KB as PNG
    photo = cv2.imencode(".png", big)[1].tobytes()
    decoded = []
    real = folder.decode_image

    def counting(data, *args, **kwargs):
        decoded.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(lookup, "decode_image", counting)
    monkeypatch.setattr(folder, "decode_image", counting)
    server = Server(root / "cat", max_pixels=120_000_000, token=TOKEN)
    try:
        answer = search(server, [("image", ("big.png", photo)),
                                 ("image", ("q.png", (data / "circle" / "000.png").read_bytes()))])
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert [r["query"] for r in results] == ["big.png", "q.png"]
        assert all(len(r["matches"]) == 5 for r in results)
        assert len(decoded) == 2  # each upload once
        added = add(server, [("image", ("big.png", photo))], "big")  # an add too: once, kept
        assert added.status_code == 200 and added.json()["added"] == 1, added.text
        assert len(decoded) == 3
        refused = Server(root / "cat")  # the default limit: a 400 naming it, not a silent 200
        try:
            answer = search(refused, [("image", ("big.png", photo))])
            assert answer.status_code == 400 and "pixels" in answer.json()["error"]
        finally:
            refused.stop()
    finally:
        server.stop()
