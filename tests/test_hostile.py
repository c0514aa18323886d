"""A zoo of hostile inputs, each given to the real `ascension` command in a subprocess.

Every case must end within its timeout with the expected exit code. A refusal is exactly one
line on stderr, starting with "error:" and saying what is wrong; a run that goes on skips and
counts what it cannot use. No case may print a traceback or advise turning `weights_only` off.
The cases are what people really have lying around (pipes, device links, half-copied folders,
other tools' files) and what someone trying to make it fall over would type.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ascension_cli.catalog_layout import CATALOG_VERSION
from ascension_cli.cli.app import app
from ascension_cli.config import TrainConfig
from ascension_cli.train.loop import train
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # seconds; each case ends in a few


@dataclass
class Zoo:
    """Real artefacts (a 36-image folder, a checkpoint, vectors, a catalogue) to spoil."""

    root: Path
    data: Path
    checkpoint: Path
    vectors: Path
    catalog: Path

    def file(self, name: str, content: bytes = b"") -> Path:
        path = self.root / "made" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def folder(self, name: str) -> Path:
        path = self.root / "made" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def fifo(self, name: str) -> Path:
        path = self.root / "made" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path

    def spoilt_catalog(self, name: str, spoil: Callable[[Path], None]) -> Path:
        import shutil

        copy = self.root / "made" / name
        shutil.copytree(self.catalog, copy)
        spoil(copy)
        return copy


def live(catalog: Path, kind: str) -> Path:
    """The catalogue's live items or index file, as its catalog.json names it."""
    return catalog / json.loads((catalog / "catalog.json").read_text())["files"][kind]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp("zoo")
    data = make_dataset(root / "data", classes=3, per_class=12)  # 36 images, as in the report
    train(TrainConfig(
        data_root=data, save_dir=root / "run", model="test_convnext", pretrained=False,
        image_size=32, batch_size=4, target_batch=8, samples_per_class=2, epochs=1,
        max_steps=1, warmup_epochs=0, workers=0, seed=0,
    ))
    checkpoint = root / "run" / "last.pt"
    runner = CliRunner()
    for args in (["embed", checkpoint, data, "-o", root / "vectors.npz"],
                 ["index", checkpoint, data, "-o", root / "catalog"]):
        result = runner.invoke(app, [str(a) for a in args] + ["--workers", "0"])
        assert result.exit_code == 0, result.output
    return Zoo(root, data, checkpoint, root / "vectors.npz", root / "catalog")


def run(*args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ascension_cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200"})


TINY = ("--model", "test_convnext", "--no-pretrained", "--image-size", "32", "--workers", "0")


def noise(size: int) -> bytes:
    """The same random bytes every run."""
    return random.Random(size).randbytes(size)


def train_args(zoo: Zoo, name: str, *options) -> list:
    return ["train", zoo.data, *TINY, "--save-dir", zoo.root / "runs" / name, *options]


def future_vectors(zoo: Zoo) -> Path:
    with np.load(zoo.vectors) as archive:
        contents = {key: archive[key] for key in archive.files}
    contents["version"] = np.array(99)
    path = zoo.root / "made" / "future.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **contents)
    return path


def evil_checkpoint(zoo: Zoo) -> Path:
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {zoo.root / 'pwned'}",))

    path = zoo.root / "made" / "evil.pt"
    torch.save({"format": "ascension-checkpoint", "format_version": 1, "x": Exploit()}, path)
    return path


def not_torch_zip(zoo: Zoo) -> Path:
    path = zoo.root / "made" / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "a zip, but not PyTorch's")
    return path


def config_file(zoo: Zoo, name: str, content: bytes) -> list:
    return train_args(zoo, name, "--config", zoo.file(name, content))


def crowded_data(zoo: Zoo) -> Path:
    """Class folders where images sit beside a named pipe, a device link and a broken link."""
    root = make_dataset(zoo.root / "crowded", classes=3, per_class=8)
    os.mkfifo(root / "circle" / "pipe.png")
    (root / "square" / "zero.png").symlink_to("/dev/zero")
    (root / "triangle" / "gone.png").symlink_to(root / "nowhere.png")
    return root


# (id, arguments given the zoo, exit code, what the one error line (or the output) must say)
CASES: list[tuple[str, Callable[[Zoo], list], int, str]] = [
    # -- data folders
    ("data-missing", lambda z: ["train", z.root / "nowhere", *TINY], 2,
     "DATA_ROOT: folder not found"),
    ("brackets-in-a-path-are-not-markup", lambda z: ["train", z.root / "no[where]", *TINY], 2,
     "no[where]"),
    ("data-is-a-file", lambda z: ["train", z.file("f.png", b"x"), *TINY], 2,
     "is a file, not a folder"),
    ("data-is-a-pipe", lambda z: ["train", z.fifo("pipe-root"), *TINY], 2, "named pipe"),
    ("data-empty", lambda z: ["train", z.folder("empty"), *TINY], 2, "no class folders"),
    ("data-single-class", lambda z: ["train", make_dataset(z.root / "one", classes=1), *TINY,
                                     "--save-dir", z.root / "runs" / "one"], 2,
     "at least two classes"),
    ("val-root-is-a-file", lambda z: train_args(z, "v", "--val-root", z.file("v.txt")), 2,
     "--val-root: "),
    # -- manifests and shards
    ("manifest-missing", lambda z: ["train", z.root / "nowhere.csv", *TINY], 2,
     "DATA_ROOT: manifest not found"),
    ("manifest-binary", lambda z: ["train", z.file("bin.csv", bytes(range(256))), *TINY], 2,
     "not a UTF-8 CSV file"),
    ("manifest-unknown-column", lambda z: ["train", z.file("u.csv", b"path,label,colour\n"),
                                           *TINY], 2, "unknown column(s) 'colour'"),
    ("manifest-line-past-the-csv-field-limit",
     lambda z: ["train", z.file("long.csv", b"path,label\n" + b"x" * 200_000 + b",c\n"), *TINY],
     2, "line 2: not a readable CSV line"),
    ("manifest-bad-split", lambda z: ["train", z.file("s.csv", b"path,label,split\n"
                                                      b"a.png,x,holdout\n"), *TINY], 2,
     "line 2: split is 'holdout'"),
    ("manifest-parquet-random-bytes", lambda z: ["embed", z.checkpoint,
                                                 z.file("r.parquet", noise(500))], 2,
     "not a readable Parquet file"),
    ("shards-without-dataset-json", lambda z: ["train", z.file("shards/s-000.tar",
                                                              noise(2048)), *TINY], 2,
     "no readable dataset.json beside the shards"),
    ("shards-dataset-json-is-a-pipe",
     lambda z: ["train", z.file("piped/s-000.tar", noise(1024)).parent / "s-{000..000}.tar",
                *TINY] if z.fifo("piped/dataset.json") else [], 2,
     "no readable dataset.json beside the shards"),
    ("shards-dataset-json-is-a-list",
     lambda z: ["train", z.file("listed/s-000.tar", noise(1024)), *TINY]
     if z.file("listed/dataset.json", b"[1, 2]") else [], 2,
     "does not describe Ascension shards"),
    ("shard-url-not-tar", lambda z: ["train", "https://example.invalid/data", *TINY], 2,
     "a URL must name .tar shards"),
    ("shard-size-nonsense", lambda z: ["shard", z.data, "-o", z.root / "sh", "--shard-size",
                                       "lots"], 2, "is not a size"),
    ("pipes-and-device-links-are-skipped-and-counted",
     lambda z: ["train", crowded_data(z), *TINY, "--save-dir", z.root / "runs" / "crowded",
                "--batch-size", "4", "--target-batch", "8", "--samples-per-class", "2",
                "--epochs", "1", "--max-steps", "1"], 0,
     "1 broken link, 2 not a regular file"),
    # -- option values, alone and against the data
    ("huge-batches", lambda z: train_args(z, "h", "--batch-size", "1000000000",
                                          "--target-batch", "1000000000"), 2,
     "fewer than --target-batch 1000000000"),
    ("target-batch-past-the-data", lambda z: train_args(z, "t", "--target-batch", "1024"), 2,
     "give --target-batch 16"),
    ("samples-per-class-mostly-repeats",
     lambda z: ["train", make_dataset(z.root / "six", classes=6, per_class=6), *TINY,
                "--save-dir", z.root / "runs" / "six", "--batch-size", "16",
                "--target-batch", "16", "--samples-per-class", "16"], 2,
     "give --samples-per-class 8 or less"),
    ("lr-nan", lambda z: train_args(z, "n", "--lr", "nan"), 2, "--lr"),
    ("epochs-zero", lambda z: train_args(z, "e", "--epochs", "0"), 2, "--epochs"),
    ("image-size-huge", lambda z: train_args(z, "i", "--image-size", "100000"), 2,
     "--image-size"),
    ("batch-not-dividing", lambda z: train_args(z, "d", "--batch-size", "3",
                                                "--target-batch", "8"), 2, "multiple"),
    ("device-nonsense", lambda z: train_args(z, "x", "--device", "gpu:;rm"), 2, "--device"),
    ("no-positives", lambda z: train_args(z, "p", "--views", "1", "--samples-per-class", "1"),
     2, "no anchor has a positive"),
    ("save-dir-is-a-file", lambda z: train_args(z, "s") + ["--save-dir", z.file("taken")], 2,
     "is a file, not a folder"),
    ("save-dir-under-a-file", lambda z: train_args(z, "s") + [
        "--save-dir", z.file("taken2") / "run"], 2, "is a file, not a folder"),
    ("config-is-a-folder", lambda z: train_args(z, "c", "--config", z.folder("cfg")), 2,
     "is a folder, not a file"),
    ("config-is-a-list", lambda z: config_file(z, "list.yaml", b"- 1\n- 2\n"), 2,
     "must hold a mapping"),
    ("config-is-binary", lambda z: config_file(z, "bin.yaml", bytes(range(256))), 2,
     "cannot parse config file"),
    ("config-unknown-key", lambda z: config_file(z, "k.yaml", b"learning_rate: 1\n"), 2,
     "unknown option 'learning_rate'"),
    ("weights-random-bytes", lambda z: train_args(z, "w", "--weights",
                                                 z.file("w.pth", noise(300))), 2,
     "(300 bytes) is not a weights file, or is damaged: PyTorch cannot read it"),
    ("weights-is-a-folder", lambda z: train_args(z, "w2", "--weights", z.folder("wdir")), 2,
     "is a folder, not a file"),
    ("resume-from-random-bytes", lambda z: train_args(z, "r", "--resume",
                                                     z.file("r.pt", noise(64))), 2,
     "is not an Ascension checkpoint"),
    # -- checkpoint files
    ("checkpoint-random-bytes", lambda z: ["embed", z.file("rand.pt", noise(1000)),
                                           z.data], 2, "(1000 bytes) is not an Ascension"),
    ("checkpoint-empty", lambda z: ["embed", z.file("empty.pt"), z.data], 2,
     "(0 bytes) is not an Ascension checkpoint"),
    ("checkpoint-truncated", lambda z: ["embed", z.file(
        "cut.pt", z.checkpoint.read_bytes()[: z.checkpoint.stat().st_size // 2]), z.data], 2,
     "PyTorch cannot read it (damaged, cut short"),
    ("checkpoint-zip-not-torch", lambda z: ["embed", not_torch_zip(z), z.data], 2,
     "is not an Ascension checkpoint"),
    ("checkpoint-with-code", lambda z: ["embed", evil_checkpoint(z), z.data], 2,
     "refused unread"),
    ("checkpoint-of-another-program", lambda z: ["export", torch_file(
        z, "timm.pth", {"state_dict": {"w": torch.ones(2)}}), "-o", z.root / "m.onnx"], 2,
     "another program wrote it"),
    ("checkpoint-is-a-pipe", lambda z: ["embed", z.fifo("pipe.pt"), z.data], 2,
     "named pipe, not a regular file"),
    ("checkpoint-is-a-folder", lambda z: ["embed", z.folder("ckdir"), z.data], 2,
     "is a folder, not a file"),
    ("embed-output-is-a-folder", lambda z: ["embed", z.checkpoint, z.data, "-o",
                                            z.folder("out")], 2, "is a folder"),
    ("embed-images-missing", lambda z: ["embed", z.checkpoint, z.root / "nowhere"], 2,
     "IMAGE_ROOT: folder not found"),
    # -- vectors files
    ("vectors-text", lambda z: ["eval", z.file("v.npz", b"id,x\n1,2\n")], 2,
     "is not an Ascension vectors file"),
    ("vectors-of-another-tool", lambda z: ["eval", np_file(z, "other.npz", x=np.eye(3))], 2,
     "another tool wrote it"),
    ("vectors-future-version", lambda z: ["eval", future_vectors(z)], 2,
     "version-99 vectors file"),
    ("gallery-is-a-folder", lambda z: ["eval", z.vectors, "--gallery", z.folder("gal")], 2,
     "--gallery: "),
    ("eval-checkpoint-without-images", lambda z: ["eval", z.checkpoint], 2, "needs IMAGE_ROOT"),
    ("eval-k-zero", lambda z: ["eval", z.vectors, "--k", "0"], 2, "--k"),
    ("report-of-another-tools-vectors", lambda z: ["report", np_file(z, "r.npz", x=np.eye(2))],
     2, "another tool wrote it"),
    ("report-run-folder-without-images", lambda z: ["report", z.checkpoint.parent], 2,
     "needs IMAGE_ROOT"),
    ("report-output-is-a-folder", lambda z: ["report", z.vectors, "-o", z.folder("rep")], 2,
     "is a folder"),
    ("eval-json-is-a-folder", lambda z: ["eval", z.vectors, "--json", z.folder("js")], 2,
     "is a folder"),
    # -- catalogues and queries
    ("catalog-without-index", lambda z: ["search", z.spoilt_catalog(
        "no-index", lambda c: live(c, "index").unlink()), z.data], 2, "lacks index-000001.faiss"),
    ("catalog-without-model", lambda z: ["search", z.spoilt_catalog(
        "no-model", lambda c: (c / "model.pt").unlink()), z.data], 2, "lacks model.pt"),
    ("catalog-json-garbage", lambda z: ["search", z.spoilt_catalog(
        "garbage", lambda c: (c / "catalog.json").write_bytes(b"\xff{")), z.data], 2,
     "is damaged"),
    ("catalog-other-version", lambda z: ["search", z.spoilt_catalog(
        "v99", lambda c: (c / "catalog.json").write_text(
            (c / "catalog.json").read_text().replace(f'"version": {CATALOG_VERSION}',
                                                     '"version": 99'))),
        z.data], 2, "version-99 catalogue"),
    ("catalog-items-damaged", lambda z: ["search", z.spoilt_catalog(
        "items", lambda c: live(c, "items").write_bytes(b"PK\x03\x04 cut")), z.data], 2,
     "items-000001.npz (8 bytes) is not part of an Ascension catalogue"),
    ("catalog-index-damaged", lambda z: ["search", z.spoilt_catalog(
        "index", lambda c: live(c, "index").write_bytes(noise(100))), z.data,
        "--workers", "0"], 2,
     "index-000001.faiss (100 bytes) is not part of an Ascension catalogue"),
    ("catalog-is-a-plain-folder", lambda z: ["search", z.data, z.data], 2,
     "not an Ascension catalogue"),
    ("query-is-a-pipe", lambda z: ["search", z.catalog, z.fifo("q.jpg")], 2, "named pipe"),
    ("query-folder-without-images", lambda z: ["search", z.catalog, z.folder("noimg")], 2,
     "no images in folder"),
    ("index-add-to-a-plain-folder", lambda z: ["index", z.checkpoint, z.data, "-o",
                                               z.folder("plain"), "--add"], 2,
     "not an Ascension catalogue"),
    ("index-output-is-a-file", lambda z: ["index", z.checkpoint, z.data, "-o",
                                          z.file("cat.txt")], 2, "is a file, not a folder"),
    ("serve-a-plain-folder", lambda z: ["serve", z.data], 2, "not an Ascension catalogue"),
    ("serve-writes-without-a-token", lambda z: ["serve", z.catalog, "--allow-writes"], 2,
     "writes need both --allow-writes and --token"),
    ("serve-port-out-of-range", lambda z: ["serve", z.catalog, "--port", "70000"], 2, "--port"),
    ("export-output-is-a-folder", lambda z: ["export", z.checkpoint, "-o", z.folder("exp")], 2,
     "is a folder"),
]


def torch_file(zoo: Zoo, name: str, payload) -> Path:
    path = zoo.root / "made" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def np_file(zoo: Zoo, name: str, **arrays) -> Path:
    path = zoo.root / "made" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_the_zoo_is_large():
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("make", "code", "says"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_hostile_input_ends_cleanly(zoo, make, code, says):
    result = run(*make(zoo))
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    assert "weights_only=False" not in everything and "weights_only" not in result.stderr
    assert result.returncode == code, everything
    if code == 0:
        assert says in everything, everything
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and says in lines[0], lines[0]
    assert not (zoo.root / "pwned").exists()  # a checkpoint's code never runs


def test_sigterm_inside_a_long_step_ends_within_seconds(tmp_path):
    """Each step here runs 32 micro-batches of 64 px images; SIGTERM still ends it quickly."""
    data = make_dataset(tmp_path / "data", classes=4, per_class=40, size=64)
    save_dir = tmp_path / "run"
    command = [sys.executable, "-m", "ascension_cli", "train", data, *TINY, "--image-size",
               "64", "--batch-size", "4", "--target-batch", "128", "--samples-per-class", "32",
               "--epochs", "50", "--val-fraction", "0.05", "--save-dir", save_dir]
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not (save_dir / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(4)  # inside the first epoch's steps
        process.send_signal(signal.SIGTERM)
        sent = time.time()
        _, stderr = process.communicate(timeout=30)
        took = time.time() - sent
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert took < 10, f"took {took:.1f} s to stop"
    assert "--resume auto" in stderr
    assert (save_dir / "last.pt").is_file()
