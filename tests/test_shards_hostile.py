"""Shards are untrusted input: every field of dataset.json and of each sample is checked, with
one line naming the shard and member; oversized members (compressed shards included) are
refused from their headers."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ascension_cli.cli.app import app
from ascension_cli.data.folder import scan_folder
from ascension_cli.data.shards import MAX_IMAGE_BYTES, open_shards, read_samples, write_shards
from ascension_cli.errors import DataError
from tests.conftest import make_dataset
from tests.test_catalog import train_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    data = make_dataset(root / "data", classes=4, per_class=12)
    write_shards(scan_folder(data), root / "clean", shard_bytes=40_000)
    return root


def copy_of(made: Path, name: str) -> Path:
    import shutil

    folder = made / name
    shutil.copytree(made / "clean", folder)
    return folder


def spoil_sidecar(folder: Path, change) -> Path:
    sidecar = json.loads((folder / "dataset.json").read_text())
    change(sidecar)
    (folder / "dataset.json").write_text(json.dumps(sidecar))
    return folder


SIDECARS = [
    ("classes-not-a-list", lambda s: s.update(classes="circle"), "classes must be a list"),
    ("duplicate-classes", lambda s: s.update(classes=[s["classes"][0]] * len(s["classes"])),
     "distinct"),
    ("class-counts-short", lambda s: s.update(class_counts=s["class_counts"][:2]),
     "class_counts must be 4 whole numbers"),
    ("shard-count-text", lambda s: s["shards"][0].update(count="many"),
     "shards[0].count must be a whole number"),
    ("shard-count-negative", lambda s: s["shards"][0].update(count=-3),
     "shards[0].count must be a whole number"),
    ("shard-name-a-path", lambda s: s["shards"][0].update(name="../../etc/passwd"),
     "shards[0].name must be a distinct plain file name"),
    ("shard-class-counts-short", lambda s: s["shards"][1].update(class_counts=[1]),
     "shards[1].class_counts must be 4"),
    ("shard-class-counts-wrong-sum", lambda s: s["shards"][1].update(
        class_counts=[c + 1 for c in s["shards"][1]["class_counts"]]), "do not add up"),
    ("shards-not-objects", lambda s: s.update(shards=[1, 2]), "shards[0] is not an object"),
    # Counts size allocations (a label per sample): never more than the shards hold.
    ("class-counts-huge", lambda s: ([shard.pop("class_counts") for shard in s["shards"]],
                                     s.update(class_counts=[10**13] * 4)), "add up to"),
    ("shard-count-beyond-its-file", lambda s: (
        [shard.pop("class_counts") for shard in s["shards"]],
        s["class_counts"].__setitem__(0, s["class_counts"][0] + 10**6 - s["shards"][0]["count"]),
        s["shards"][0].update(count=10**6)), "cannot"),
]


@pytest.mark.parametrize("change, expected", [c[1:] for c in SIDECARS],
                         ids=[c[0] for c in SIDECARS])
def test_a_malformed_dataset_json_is_one_line_naming_the_field(made, change, expected, request):
    folder = spoil_sidecar(copy_of(made, request.node.callspec.id), change)
    with pytest.raises(DataError, match="write the shards again") as raised:
        open_shards(folder)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def rewrite_member(shard: Path, suffix: str, data: bytes) -> None:
    """The shard with the first member ending in ``suffix`` replaced by ``data``."""
    with tarfile.open(shard) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    done = False
    with tarfile.open(shard, "w") as archive:
        for member, content in members:
            if not done and member.name.endswith(suffix):
                content, done = data, True
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))


MEMBERS = [(".cls", b"abc", "cls is not a class index"),
           (".cls", b"7", "cls is class 7, outside the 4 classes"),
           (".cls", b"-1", "cls is class -1"),
           (".json", b"{not json", "json is not JSON"),
           (".json", b"[1, 2]", "json is not an object"),
           (".json", b'{"path": 5}', "json is not an object with a text path")]


@pytest.mark.parametrize("suffix, data, expected", MEMBERS,
                         ids=["cls-text", "cls-out-of-range", "cls-negative", "json-garbage",
                              "json-a-list", "json-path-a-number"])
def test_a_malformed_sample_is_one_line_naming_shard_and_member(made, suffix, data, expected,
                                                                 request):
    folder = copy_of(made, request.node.callspec.id)
    shard = folder / "shard-000000.tar"
    rewrite_member(shard, suffix, data)
    with pytest.raises(DataError, match="shard-000000.tar: member") as raised:
        list(read_samples(str(shard), classes=4))
    assert expected in str(raised.value)


def test_a_compressed_shard_holding_a_huge_member_is_refused_from_its_header(made):
    folder = copy_of(made, "gzip-bomb")
    shard = folder / "shard-000000.tar"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("000000001.png")
        info.size = MAX_IMAGE_BYTES + 1
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    shard.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=1))
    assert shard.stat().st_size < 1_000_000
    started = time.perf_counter()
    with pytest.raises(DataError, match="over the bound"):
        list(read_samples(str(shard)))
    assert time.perf_counter() - started < 5


def test_train_and_embed_end_in_one_line_on_bad_shards(made, tmp_path):
    data, checkpoint = train_tiny(tmp_path)
    short = spoil_sidecar(copy_of(made, "cli-short"),
                          lambda s: s.update(class_counts=s["class_counts"][:1]))
    trained = runner.invoke(app, ["train", str(short), "--val-root", str(data), "--model",
                                  "test_convnext", "--no-pretrained", "--image-size", "32",
                                  "--workers", "0", "--epochs", "1", "--save-dir",
                                  str(tmp_path / "run2")])
    assert trained.exit_code == 2 and "class_counts must be" in trained.output, trained.output
    bad_member = copy_of(made, "cli-member")
    rewrite_member(bad_member / "shard-000000.tar", ".cls", b"99")
    embedded = runner.invoke(app, ["embed", str(checkpoint), str(bad_member), "-o",
                                   str(tmp_path / "v.npz"), "--workers", "0"])
    assert embedded.exit_code == 2 and "outside the 4 classes" in embedded.output, \
        embedded.output
    assert "Traceback" not in embedded.output
