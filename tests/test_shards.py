"""WebDataset shards: writing, reading (folder, pattern), bad shards, streams split across ranks
and workers without overlap, class-balanced draws, exact resume, and train/embed from shards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ascension_cli.cli.app import app
from ascension_cli.config import TrainConfig
from ascension_cli.config.fields import parse_size
from ascension_cli.data.augment import train_transform
from ascension_cli.data.folder import scan_folder
from ascension_cli.data.shards import (
    expand_braces,
    open_shards,
    read_samples,
    write_shards,
)
from ascension_cli.data.stream import ShardTrainStream, stream_count
from ascension_cli.embedding.vectors import load_vectors
from ascension_cli.errors import ConfigError, DataError, Interrupted
from ascension_cli.train.loop import train
from tests.conftest import make_dataset
from tests.test_interruption import SignalAtStep, options, same_weights

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def sharded(tmp_path):
    data = make_dataset(tmp_path / "data", classes=4, per_class=12)
    sidecar = write_shards(scan_folder(data), tmp_path / "shards", shard_bytes=40_000)
    return data, tmp_path / "shards", sidecar


def test_sizes_and_patterns():
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20
    assert parse_size("1e3") == 1000 and parse_size("2.5 kb") == 2500
    with pytest.raises(ValueError, match="not a size"):
        parse_size("big")
    assert expand_braces("s/shard-{000008..000010}.tar") == [
        "s/shard-000008.tar", "s/shard-000009.tar", "s/shard-000010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_every_image_lands_in_exactly_one_shard_as_it_was(sharded):
    data, folder, sidecar = sharded
    scan = scan_folder(data)
    assert len(sidecar["shards"]) > 3 and sidecar["count"] == len(scan) == 48
    assert sum(shard["count"] for shard in sidecar["shards"]) == 48
    assert all(shard["bytes"] <= 40_000 for shard in sidecar["shards"])
    seen = {}
    for shard in sidecar["shards"]:
        for sample in read_samples(str(folder / shard["name"])):
            seen[sample.meta["path"]] = sample
    assert len(seen) == 48
    for index, path in enumerate(scan.paths):
        sample = seen[scan.name(index)]
        assert sample.data == path.read_bytes() and sample.label == scan.labels[index]
        assert sample.meta["label"] == scan.classes[scan.labels[index]]
    assert not list(folder.glob("*.tmp"))


def test_opening_by_folder_pattern_and_the_errors(sharded, tmp_path):
    _, folder, sidecar = sharded
    whole = open_shards(folder)
    assert whole.count == 48 and whole.classes == ["circle", "cross", "square", "triangle"]
    some = open_shards(f"{folder}/shard-{{000000..000001}}.tar")
    assert some.urls == [f"{folder}/shard-000000.tar", f"{folder}/shard-000001.tar"]
    assert some.counts == [shard["count"] for shard in sidecar["shards"][:2]]
    assert sum(some.class_counts) == sum(some.counts) < sum(whole.class_counts) == 48
    with pytest.raises(DataError, match="not among the shards"):
        open_shards(f"{folder}/other-{{0..1}}.tar")
    with pytest.raises(DataError, match="shard not found"):
        os.remove(folder / "shard-000001.tar")
        open_shards(f"{folder}/shard-{{000000..000001}}.tar")
    with pytest.raises(DataError, match="no readable dataset.json"):
        os.remove(folder / "dataset.json")
        open_shards(f"{folder}/shard-000000.tar")


def test_a_damaged_shard_is_one_error(sharded):
    _, folder, sidecar = sharded
    path = folder / "shard-000000.tar"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])  # a download cut short
    with pytest.raises(DataError, match="damaged shard"):
        list(read_samples(str(path), sidecar["shards"][0]["count"]))
    path.write_bytes(whole[:700] + b"garbage" * 100)  # a header overwritten
    with pytest.raises(DataError, match="damaged shard"):
        list(read_samples(str(path), sidecar["shards"][0]["count"]))


def stream(shards, rank=0, world=1, micro=4, per_step=2, spc=2, steps=3, seed=0, mix=True):
    return ShardTrainStream(shards, train_transform("none", 32, (0.5,) * 3, (0.5,) * 3), 2,
                            micro, per_step, spc, steps, 16, seed, rank, world, mix=mix)


def test_ranks_and_workers_read_disjoint_shards_covering_all(sharded):
    _, folder, _ = sharded
    shards = open_shards(folder)
    assert stream_count(shards, 2, 8) == len(shards.urls) // 2
    with pytest.raises(ConfigError, match="cannot be split among"):
        stream_count(shards, len(shards.urls) + 1, 1)
    read = [url for rank in range(2) for worker in range(2)
            for url in stream(shards, rank, 2)._my_shards(worker, 2)]
    assert sorted(read) == sorted(shards.urls)  # each shard once, across all four streams


def test_micro_batches_are_whole_class_groups_and_resume_skips_exactly(sharded):
    _, folder, _ = sharded
    shards = open_shards(folder)
    whole = stream(shards)
    whole.set_epoch(1)
    batches = list(whole)
    assert len(batches) == 3 * 2  # steps x micro-batches per step
    for first, second in zip(batches[::2], batches[1::2], strict=True):
        assert first.images.shape[:2] == (4, 2)  # 4 images, 2 views
        labels = first.labels.tolist() + second.labels.tolist()
        assert all(labels.count(label) % 2 == 0 for label in set(labels))  # a step: groups of 2
    mixed = sum(len(set(b.labels.tolist())) for b in batches)
    unmixed = stream(shards, mix=False)
    unmixed.set_epoch(1)
    grouped = list(unmixed)
    for batch in grouped:  # without mixing (plain accumulation) each micro-batch holds groups
        labels = batch.labels.tolist()
        assert all(labels.count(label) % 2 == 0 for label in set(labels))
    assert mixed >= sum(len(set(b.labels.tolist())) for b in grouped)
    resumed = stream(shards)
    resumed.set_epoch(1, skip=2)  # two steps were trained before the interruption
    tail = list(resumed)
    assert len(tail) == 2
    for a, b in zip(tail, batches[4:], strict=True):
        assert a.labels.tolist() == b.labels.tolist() and a.indices.tolist() == b.indices.tolist()
        assert np.array_equal(a.images.numpy(), b.images.numpy())
    other = stream(shards)
    other.set_epoch(2)
    assert [b.indices.tolist() for b in other] != [b.indices.tolist() for b in batches]


def test_shard_command_then_train_embed_from_shards(tmp_path):
    data = make_dataset(tmp_path / "data", classes=4, per_class=10)
    result = invoke("shard", data, "-o", tmp_path / "shards", "--shard-size", "16KB")
    assert result.exit_code == 0, result.output
    assert "wrote 40 images of 4 classes into" in result.output
    again = invoke("shard", data, "-o", tmp_path / "shards")
    assert again.exit_code == 2 and "already holds shards" in again.output
    count = len(json.loads((tmp_path / "shards" / "dataset.json").read_text())["shards"])
    pattern = f"{tmp_path / 'shards'}/shard-{{000000..{count - 1:06d}}}.tar"
    trained = invoke("train", pattern, "--model", "test_convnext", "--no-pretrained",
                     "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                     "--target-batch", "8", "--samples-per-class", "2", "--workers", "0",
                     "--val-root", data, "--save-dir", tmp_path / "run")
    assert trained.exit_code == 0, trained.output
    assert "epoch   1  step      5" in trained.output  # 40 images / 8 per step
    refused = invoke("train", tmp_path / "shards", "--val-fraction", "0.2", "--no-pretrained")
    assert refused.exit_code == 2 and "give --val-root" in refused.output
    checkpoint = tmp_path / "run" / "last.pt"
    for name, source in (("s.npz", tmp_path / "shards"), ("f.npz", data)):
        done = invoke("embed", checkpoint, source, "-o", tmp_path / name, "--workers", "0")
        assert done.exit_code == 0, done.output
    from_shards, from_folder = load_vectors(tmp_path / "s.npz"), load_vectors(tmp_path / "f.npz")
    assert sorted(from_shards.paths) == from_folder.paths  # shards hold a shuffled order
    order = [from_shards.paths.index(path) for path in from_folder.paths]
    np.testing.assert_allclose(from_shards.vectors[order], from_folder.vectors, atol=1e-5)
    assert from_shards.labels[order].tolist() == from_folder.labels.tolist()


def test_a_signal_mid_epoch_on_shards_resumes_exactly(tmp_path):
    data = make_dataset(tmp_path / "data", classes=4, per_class=12)
    write_shards(scan_folder(data), tmp_path / "shards", shard_bytes=20_000)
    values = dict(data_root=tmp_path / "shards", val_root=data, shuffle_buffer=16)
    config = {**options(data, tmp_path / "whole"), **values}
    config.pop("val_fraction")
    train(TrainConfig(**config))
    with pytest.raises(Interrupted):
        train(TrainConfig(**{**config, "save_dir": tmp_path / "parts"}),
              SignalAtStep(4, signal.SIGTERM))
    train(TrainConfig(**{**config, "save_dir": tmp_path / "parts", "resume": "auto"}))
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "parts" / "last.pt")


def test_two_processes_train_from_shards(tmp_path):
    data = make_dataset(tmp_path / "data", classes=4, per_class=10)
    write_shards(scan_folder(data), tmp_path / "shards", shard_bytes=40_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "ascension_cli", "train", str(tmp_path / "shards"), "--model", "test_convnext",
         "--no-pretrained", "--image-size", "32", "--batch-size", "4", "--target-batch", "16",
         "--samples-per-class", "2", "--epochs", "2", "--warmup-epochs", "0", "--workers", "1",
         "--val-root", str(data), "--save-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("epoch   2") == 1  # rank 0 reports; both ranks stepped alike


def test_a_url_pattern_reads_through_webdataset(sharded, tmp_path):
    pytest.importorskip("webdataset")
    _, folder, _ = sharded
    shards = open_shards(f"file://{folder}/shard-{{000000..000001}}.tar")
    samples = [s for url in shards.urls for s in read_samples(url)]
    assert len(samples) == sum(shards.counts)


def tar_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_samples_without_image_or_class_are_skipped(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(tar_with({"a.png": b"png", "a.cls": b"1", "b.cls": b"0",
                               "c.jpg": b"jpg", "d.jpg": b"d", "d.cls": b"2"}))
    assert [(s.key, s.label) for s in read_samples(str(path))] == [("a", 1), ("d", 2)]
