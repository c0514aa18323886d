"""Every command and its API function, on the same input, give the same result: the command
line only parses, calls ``ascension_cli.api.run_*`` and prints."""

from __future__ import annotations

import json
import subprocess
import tarfile
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ascension_cli import api
from ascension_cli.cli.app import app
from ascension_cli.config import ServeConfig, resolve
from ascension_cli.embedding.vectors import load_vectors
from tests.conftest import CLI, make_dataset

runner = CliRunner()
TINY = {"model": "test_convnext", "pretrained": False, "image_size": 32, "batch_size": 4,
        "target_batch": 8, "samples_per_class": 2, "epochs": 1, "warmup_epochs": 0,
        "workers": 0, "val_fraction": 0.25, "seed": 0}


def flags(options: dict) -> list[str]:
    """The command line's spelling of keyword options."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    data = make_dataset(root / "data", classes=4, per_class=8)
    run = api.train_supcon(data, save_dir=root / "run", **TINY)
    return root, data, run.last_checkpoint


def test_train(made, tmp_path):
    _, data, _ = made
    invoke("train", data, "--save-dir", tmp_path / "cli", *flags(TINY))
    summary = api.train_supcon(data, save_dir=tmp_path / "api", **TINY)
    by_cli = torch.load(tmp_path / "cli" / "last.pt", weights_only=True)
    by_api = torch.load(summary.last_checkpoint, weights_only=True)
    for name, tensor in by_cli["model"].items():
        torch.testing.assert_close(by_api["model"][name], tensor, rtol=0, atol=0)
    assert [r["val_recall_at_1"] for r in by_cli["history"]] == [
        r.val_recall_at_1 for r in summary.history]


def test_embed(made, tmp_path):
    _, data, checkpoint = made
    invoke("embed", checkpoint, data, "-o", tmp_path / "cli.npz", "--workers", "0",
           "--chunk-size", "10")
    vectors = api.embed(checkpoint, data, tmp_path / "api.npz", workers=0, chunk_size=10)
    by_cli = load_vectors(tmp_path / "cli.npz")
    assert by_cli.paths == vectors.paths and by_cli.labels.tolist() == vectors.labels.tolist()
    np.testing.assert_array_equal(by_cli.vectors, vectors.vectors)
    # In memory (no file) is the same pipeline, its parts kept in memory.
    np.testing.assert_array_equal(api.embed(checkpoint, data, workers=0, chunk_size=10).vectors,
                                  vectors.vectors)


def test_eval_and_report_from_a_checkpoint_with_recolouring(made, tmp_path):
    _, data, checkpoint = made
    invoke("eval", checkpoint, data, "--recolor", "--workers", "0", "--json",
           tmp_path / "cli.json")
    run = api.evaluate(checkpoint, image_root=data, recolor=True, workers=0,
                       json_file=tmp_path / "api.json")
    by_cli = json.loads((tmp_path / "cli.json").read_text())
    assert by_cli == json.loads((tmp_path / "api.json").read_text())
    assert by_cli["recall_at_k"]["1"] == pytest.approx(run.clean.report.recall_at_k[1])
    assert set(run.recoloured) == set(by_cli["recolor"])

    output = invoke("report", checkpoint, data, "--workers", "0", "-o", tmp_path / "cli.html")
    info = api.report(checkpoint, tmp_path / "api.html", image_root=data, workers=0)
    assert "report written" in output and info.path.is_file()
    assert (tmp_path / "cli.html").stat().st_size == pytest.approx(info.path.stat().st_size,
                                                                   rel=0.01)


def test_index_and_search(made, tmp_path):
    _, data, checkpoint = made
    invoke("index", checkpoint, data, "-o", tmp_path / "cli", "--workers", "0")
    built = api.index(checkpoint, data, tmp_path / "api", workers=0).catalog
    from ascension_cli.catalog.store import load_catalog

    by_cli = load_catalog(tmp_path / "cli")
    assert by_cli.paths == built.paths and by_cli.class_names == built.class_names
    np.testing.assert_array_equal(by_cli.vectors, built.vectors)

    query = data / "square" / "002.png"
    invoke("search", tmp_path / "cli", query, "--k", "3", "--workers", "0", "--json",
           tmp_path / "cli.json")
    results = api.search(tmp_path / "cli", query, k=3, workers=0)
    saved = json.loads((tmp_path / "cli.json").read_text())["results"]
    assert saved == [result.to_dict() for result in results]


def test_calibrate(made, tmp_path):
    import shutil

    _, data, checkpoint = made
    api.index(checkpoint, data, tmp_path / "cli", workers=0)
    shutil.copytree(tmp_path / "cli", tmp_path / "api")
    invoke("calibrate", tmp_path / "cli", data, "--unknown-classes", "0.25", "--workers", "0")
    calibrated = api.calibrate(tmp_path / "api", data, unknown_classes=0.25, workers=0)
    by_cli = json.loads((tmp_path / "cli" / "catalog.json").read_text())["calibration"]
    by_api = dict(calibrated.calibration)
    for saved in (by_cli, by_api):
        saved.pop("calibrated_at")
    assert by_cli == by_api


def test_manifest_and_shard(made, tmp_path):
    _, data, _ = made
    invoke("manifest", data, "-o", tmp_path / "cli.csv")
    api.manifest(data, tmp_path / "api.csv")
    assert (tmp_path / "cli.csv").read_text() == (tmp_path / "api.csv").read_text()

    invoke("shard", data, "-o", tmp_path / "cli-shards")
    api.shard(data, tmp_path / "api-shards")

    def members(folder):
        return [(member.name, member.size) for shard in sorted(folder.glob("*.tar"))
                for member in tarfile.open(shard).getmembers()]

    assert members(tmp_path / "cli-shards") == members(tmp_path / "api-shards")
    assert ((tmp_path / "cli-shards" / "dataset.json").read_text()
            == (tmp_path / "api-shards" / "dataset.json").read_text())


def test_export(made, tmp_path):
    pytest.importorskip("onnx")
    _, _, checkpoint = made
    output = invoke("export", checkpoint, "-o", tmp_path / "cli.onnx")
    info = api.export(checkpoint, tmp_path / "api.onnx")
    assert f"input (batch, 3, {info['image_size']}" in output
    assert (tmp_path / "cli.onnx").stat().st_size == (tmp_path / "api.onnx").stat().st_size


def test_demo(tmp_path):
    output = invoke("demo", "--epochs", "1", "--workdir", tmp_path / "cli")
    before, after = api.demo(epochs=1, workdir=tmp_path / "api")
    assert f"before training {before:.4f} -> after {after:.4f}" in output


def test_serve(made, tmp_path):
    requests = pytest.importorskip("requests")
    pytest.importorskip("fastapi")
    import uvicorn

    from tests.test_serve import free_port, wait_healthy

    _, data, checkpoint = made
    api.index(checkpoint, data, tmp_path / "cat", workers=0)
    photo = (data / "circle" / "001.png").read_bytes()
    cli_port, api_port = free_port(), free_port()
    process = subprocess.Popen([*CLI, "serve", str(tmp_path / "cat"), "--port", str(cli_port),
                                "--device", "cpu"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    settings = {"device": "cpu", "port": api_port}
    app_of_api = api.serve_app(resolve(ServeConfig, {"catalog": tmp_path / "cat", **settings}))
    server = uvicorn.Server(uvicorn.Config(app_of_api, host="127.0.0.1", port=api_port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        answers = []
        for port in (cli_port, api_port):
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, process)
            answer = requests.post(url + "/search", files=[("image", ("q.png", photo))],
                                   data={"k": "3"}, timeout=60).json()
            answers.append(answer["results"])
        assert answers[0] == answers[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        process.terminate()
        process.wait(timeout=30)
