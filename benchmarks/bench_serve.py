"""`ascension serve` under concurrent clients, against one-request-one-forward, in the same run.

Builds a catalogue (tf_efficientnet_lite0 from ../shared/weights when present, else a tiny timm
test model), then on 127.0.0.1 measures requests/s and p50/p95/p99 latency of:
  - serve: `ascension serve` (requests arriving together share a forward pass);
  - plain: a plain FastAPI endpoint that embeds each request alone (same model and pipeline);
  - search: `ascension search` run once per image (the command line's cost per question).
Clients and time are bounded. Each server runs in its own process. Prints a table, writes JSON.

    python benchmarks/bench_serve.py --quick   # 8 clients, 96 px
    python benchmarks/bench_serve.py           # 1 and 16 clients, 128 px
"""

# No "from __future__ import annotations": FastAPI reads the plain server's annotations.

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import CLI, ROOT, SHARED_DATA, benchmark_parser, print_table, write_json

WEIGHTS = ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_catalog(work: Path, image_size: int) -> tuple[Path, list[Path]]:
    from ascension_cli import train_supcon
    from ascension_cli.catalog.build import build_catalog as build
    from tests.conftest import make_dataset

    source = SHARED_DATA / "sign-language-digits"
    if source.is_dir():
        data = work / "data"
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            (data / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:20]:
                (data / folder.name / image.name).symlink_to(image)
    else:
        data = make_dataset(work / "data", classes=6, per_class=20, size=96)
    model = ({"model": "tf_efficientnet_lite0", "weights": WEIGHTS} if WEIGHTS.is_file()
             else {"model": "test_efficientnet", "pretrained": False})
    run = train_supcon(data, batch_size=16, target_batch=32, epochs=1, max_steps=1,
                       save_dir=work / "run", image_size=image_size, workers=0,
                       val_fraction=0, **model)
    build(run.last_checkpoint, data, work / "catalog", workers=0)
    return work / "catalog", sorted(data.rglob("*.*"))[:64]


def start(command: list[str], url: str) -> subprocess.Popen:
    import requests

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return process
        except requests.ConnectionError:
            time.sleep(0.3)
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read())
    raise RuntimeError("the server did not start")


def load(url: str, images: list[Path], clients: int, requests_total: int,
         seconds: float) -> dict:
    """``clients`` threads each posting one image per request, until the count or the time."""
    import requests

    payloads = [(p.name, p.read_bytes()) for p in images]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def client(number: int) -> None:
        session = requests.Session()
        sent = number
        while sent < requests_total and time.perf_counter() < deadline:
            name, data = payloads[sent % len(payloads)]
            started = time.perf_counter()
            response = session.post(url + "/search", files=[("image", (name, data))],
                                    timeout=120)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            sent += clients

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return summary(latencies, time.perf_counter() - started)


def summary(latencies: list[float], seconds: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "requests_per_second": len(latencies) / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def plain_server(catalog: str, port: str) -> None:
    """A plain FastAPI endpoint: each request embedded alone, as a simple service would."""
    import uvicorn
    from fastapi import FastAPI, UploadFile

    from ascension_cli.catalog.search import CatalogSearcher
    from ascension_cli.catalog.store import load_catalog

    searcher = CatalogSearcher(load_catalog(catalog))
    app = FastAPI()
    options = {"workers": 0, "precision": "auto", "device": "auto", "channels_last": True}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/search")
    def search(image: UploadFile) -> dict:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / (image.filename or "q.jpg")
            path.write_bytes(image.file.read())
            vectors, indices = searcher.embed([path], **options)
            results = searcher.match(vectors, [path.name], 5)
        return {"results": [r.to_dict() for r in results]}

    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


def search_per_image(catalog: Path, images: list[Path], count: int) -> dict:
    latencies = []
    started = time.perf_counter()
    for image in images[:count]:
        begun = time.perf_counter()
        subprocess.run([*CLI, "search", str(catalog), str(image), "--workers", "0"],
                       check=True, capture_output=True)
        latencies.append(time.perf_counter() - begun)
    return summary(latencies, time.perf_counter() - started)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--plain-server":
        plain_server(sys.argv[2], sys.argv[3])
        return
    parser = benchmark_parser(__doc__, __file__)
    parser.add_argument("--seconds", type=float, default=30.0, help="time limit per run")
    args = parser.parse_args()
    image_size = 96 if args.quick else 128
    many = 8 if args.quick else 16
    total = 64 if args.quick else 192
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        catalog, images = build_catalog(Path(folder), image_size)
        servers = {
            "serve": [*CLI, "serve", str(catalog), "--port", "{port}"],
            "plain": [sys.executable, __file__, "--plain-server", str(catalog), "{port}"],
        }
        for name, template in servers.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            process = start([part.replace("{port}", str(port)) for part in template], url)
            try:
                load(url, images, 1, 8, args.seconds)  # warm-up
                for clients in (1, many):
                    results[f"{name}/{clients}"] = load(url, images, clients, total, args.seconds)
            finally:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
        results["search/1"] = search_per_image(catalog, images, 2 if args.quick else 4)
    single = results["serve/1"]["p50_ms"]
    plain = results[f"plain/{many}"]["requests_per_second"]
    for key, figures in results.items():
        rows.append([key, str(figures["requests"]), f"{figures['requests_per_second']:.1f}",
                     f"{figures['p50_ms']:.0f}", f"{figures['p95_ms']:.0f}",
                     f"{figures['p99_ms']:.0f}", f"{figures['requests_per_second'] / plain:.2f}",
                     f"{figures['p95_ms'] / single:.2f}"])
    model = "tf_efficientnet_lite0" if WEIGHTS.is_file() else "test_efficientnet"
    print_table(f"lookup service on 127.0.0.1, {model} at {image_size} px",
                ["system/clients", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms",
                 f"req/s / plain@{many}", "p95 / single p50"], rows)
    write_json("bench_serve", {"image_size": image_size, "clients": many, "results": results,
                               "throughput_ratio": results[f"serve/{many}"]["requests_per_second"]
                               / plain,
                               "p95_over_single": results[f"serve/{many}"]["p95_ms"] / single},
               args.json)


if __name__ == "__main__":
    main()
