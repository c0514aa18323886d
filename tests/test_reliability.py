"""Hostile data, untrusted files and a hostile machine: clean errors, nothing lost."""

import errno
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ascension_cli.cli.app import app
from ascension_cli.config import TrainConfig, resolve
from ascension_cli.data.folder import ImageDecodeError, decode_image, load_image, scan_folder
from ascension_cli.errors import CheckpointError, ConfigError
from ascension_cli.model import checkpoint as checkpoint_module
from ascension_cli.model.checkpoint import load_checkpoint
from ascension_cli.train.loop import Reporter, train
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def tiny(data, save_dir, **overrides):
    values = dict(data_root=data, save_dir=save_dir, model="test_convnext", pretrained=False,
                  image_size=32, batch_size=4, target_batch=8, samples_per_class=2, epochs=1,
                  warmup_epochs=0, workers=0, val_fraction=0.25)
    values.update(overrides)
    return TrainConfig(**values)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def test_decompression_bomb_is_refused_before_decoding():
    header = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"x" * 64)
    with pytest.raises(ImageDecodeError, match="60000x60000 pixels is over the limit"):
        decode_image(bomb)
    ok, small = cv2.imencode(".jpg", np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match="max_image_pixels"):
        decode_image(small.tobytes(), max_pixels=100)
    assert decode_image(small.tobytes(), max_pixels=400).shape == (20, 20, 3)


def _valid_images() -> list[bytes]:
    image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    return [cv2.imencode(ext, image)[1].tobytes() for ext in (".png", ".jpg", ".bmp")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(_valid_images()),
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 255)), max_size=8),
    noise=st.binary(max_size=64),
)
def test_any_bytes_decode_or_fail_cleanly(base, cut, flips, noise):
    data = bytearray(base[: max(cut, 1)] if cut < len(base) else base)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    for candidate in (bytes(data), noise, bytes(data) + noise):
        try:
            image = decode_image(candidate)
        except ImageDecodeError:
            continue
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


option_values = st.one_of(
    st.none(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.booleans(), st.sampled_from(["auto", "cache", "fp16", "cpu", "mlp"]),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.sampled_from(sorted(set(TrainConfig.model_fields) - {"data_root", "weights", "val_root"})
                    + ["bogus_option"]),
    option_values, max_size=6,
))
def test_any_options_validate_or_fail_with_config_error(tmp_path_factory, options):
    try:
        config = resolve(TrainConfig, {"data_root": "data", **options})
    except ConfigError as error:
        assert "\n" not in str(error)
    else:
        assert config.target_batch % config.batch_size == 0


def test_non_utf8_file_names_scan_load_and_print(tmp_path):
    data = make_dataset(tmp_path / "data", classes=2, per_class=4)
    raw_name = os.path.join(os.fsencode(data / "circle"), b"caf\xe9-\xff.png")
    with open(raw_name, "wb") as handle:
        handle.write((data / "circle" / "000.png").read_bytes())
    scan = scan_folder(data)
    odd = [p for p in scan.paths if "\udcff" in str(p)]
    assert len(odd) == 1 and load_image(odd[0]).shape == (32, 32, 3)
    train(tiny(data, tmp_path / "run", target_batch=4))  # 2 x 4 images: 6 train, 2 validate
    # The CLI prints such names as escapes instead of crashing on them.
    result = subprocess.run(
        [sys.executable, "-m", "ascension_cli", "embed", str(tmp_path / "run" / "last.pt"),
         str(data), "-o", str(tmp_path / "v.npz"), "--workers", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    from ascension_cli.embedding.vectors import load_vectors

    assert any("\udcff" in p for p in load_vectors(tmp_path / "v.npz").paths)


def test_file_deleted_during_training_is_skipped(tmp_path):
    data = make_dataset(tmp_path / "data")
    victim = data / "square" / "002.png"

    class DeleteAtStart(Reporter):
        def __init__(self):
            self.messages = []

        def epoch_start(self, epoch, epochs, steps):
            victim.unlink(missing_ok=True)

        def message(self, text):
            self.messages.append(text)

    reporter = DeleteAtStart()
    result = train(tiny(data, tmp_path / "run", epochs=2, val_fraction=0.0), reporter)
    assert len(result.history) == 3
    assert any("002.png: cannot read" in m for m in reporter.messages)


def test_checkpoint_with_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint_module.FORMAT, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="is not an Ascension checkpoint.*refused unread"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_future_checkpoints_are_refused(tmp_path, dataset):
    train(tiny(dataset, tmp_path / "run"))
    good = (tmp_path / "run" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pt \(.* MB\) is not an Ascension checkpoint"
                       ", or is damaged: PyTorch cannot read it"):
        load_checkpoint(tmp_path / "cut.pt")
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an Ascension checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_gpu_out_of_memory_says_to_lower_batch_size(dataset, monkeypatch):
    from ascension_cli.train import loop

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "train", out_of_memory)
    result = runner.invoke(app, ["train", str(dataset), "--no-pretrained"])
    assert result.exit_code == 4
    assert "lower --batch-size" in result.output and "--target-batch" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_full_disk_keeps_the_previous_checkpoint(dataset, tmp_path, monkeypatch):
    train(tiny(dataset, tmp_path / "run"))

    def no_space(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_module, "atomic_write", no_space)
    result = runner.invoke(app, [
        "train", str(dataset), "--model", "test_convnext", "--no-pretrained", "--image-size",
        "32", "--batch-size", "4", "--target-batch", "8", "--samples-per-class", "2",
        "--epochs", "2", "--warmup-epochs", "0", "--workers", "0", "--val-fraction", "0.25",
        "--save-dir", str(tmp_path / "run"), "--resume", "auto"])
    assert result.exit_code == 5
    last_line = result.output.strip().splitlines()[-1]
    assert "No space left on device" in last_line and "intact" in last_line
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_resume_after_a_device_change_loads_on_the_cpu(dataset, tmp_path):
    # A checkpoint saved from another device is mapped to the CPU on load: tensors come back
    # on the CPU whatever device wrote them.
    train(tiny(dataset, tmp_path / "run"))
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(t.device.type == "cpu" for t in payload["model"].values())
    train(tiny(dataset, tmp_path / "run", epochs=2, resume="auto", device="cpu"))


def test_full_disk_keeps_the_previous_vectors_file(dataset, tmp_path, monkeypatch):
    from ascension_cli.embedding import vectors as vectors_module
    from ascension_cli.embedding.vectors import load_vectors

    train(tiny(dataset, tmp_path / "run"))
    arguments = ["embed", str(tmp_path / "run" / "last.pt"), str(dataset), "-o",
                 str(tmp_path / "v.npz"), "--workers", "0"]
    assert runner.invoke(app, arguments).exit_code == 0
    before = load_vectors(tmp_path / "v.npz").vectors

    def no_space(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(vectors_module, "atomic_write", no_space)
    result = runner.invoke(app, arguments + ["--features", "head"])
    assert result.exit_code == 5 and "No space left on device" in result.output
    monkeypatch.undo()
    assert np.array_equal(load_vectors(tmp_path / "v.npz").vectors, before)
