"""Embedding at scale: chunks kept across an interruption, and torchrun ranks sharing chunks
without overlap into the file a single process writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import ascension_cli.embedding.pipeline as chunks
from ascension_cli.cli.app import app
from ascension_cli.embedding.parts import PartCheck, parts_folder, plan_chunks
from ascension_cli.embedding.pipeline import EmbedOptions, embed_folder, embed_source
from ascension_cli.embedding.vectors import load_vectors
from ascension_cli.progress import Progress
from ascension_cli.runtime import DistributedContext
from tests.test_catalog import train_tiny

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
OPTIONS = {"workers": 0, "device": "cpu", "batch_size": 4}


class Crash(Exception):
    """The machine going away mid-run."""


class Notes(Progress):
    def __init__(self, notes):
        self.notes = notes

    def note(self, text):
        self.notes.append(text)


def embed_in_chunks(checkpoint, data, output, chunk_size, notes=None, **options):
    """The pipeline with parts kept beside ``output``, its notes appended to ``notes``."""
    return embed_source(checkpoint, data, output, EmbedOptions.of(**options),
                        Notes([] if notes is None else notes),
                        chunk_size=chunk_size)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("chunks"))


def test_chunks_are_shared_among_ranks_without_overlap(tmp_path):
    identity = {"chunk_size": 3}
    taken = []
    for rank in range(3):
        plan = plan_chunks(tmp_path / "v.npz", 11, identity, DistributedContext(rank, 3),
                           lambda: None, lambda _: None,
                           PartCheck(8, lambda c: (0, 0), lambda c, p: []))
        taken.append(plan.mine)
    assert sorted(c for mine in taken for c in mine) == list(range(11))
    assert all(set(a).isdisjoint(b) for i, a in enumerate(taken) for b in taken[i + 1:])


def test_an_interrupted_embedding_resumes_with_only_the_missing_chunks(
        tmp_path, trained, monkeypatch):
    data, checkpoint = trained
    output, parts = interrupted(tmp_path, checkpoint, data, monkeypatch)
    assert sorted(p.name for p in parts.glob("chunk-*.npz")) == [
        "chunk-000000.npz", "chunk-000001.npz"]

    real = chunks.embed_dataset
    calls = []
    monkeypatch.setattr(chunks, "embed_dataset",
                        lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    notes = []
    resumed = embed_in_chunks(checkpoint, data, output, chunk_size=8, notes=notes,
                              **OPTIONS)
    assert calls == [8, 8]  # chunks 2 and 3 only
    assert any("resuming: 2 of 4 chunks" in note for note in notes)
    whole = embed_folder(checkpoint, data, **OPTIONS)
    assert resumed.paths == whole.paths and resumed.labels.tolist() == whole.labels.tolist()
    np.testing.assert_allclose(resumed.vectors, whole.vectors, atol=1e-6)

    # Other options: the old chunks are not mixed in.
    monkeypatch.setattr(chunks, "embed_dataset", real)
    notes.clear()
    embed_in_chunks(checkpoint, data, output, chunk_size=16, notes=notes, **OPTIONS)
    assert any("starting over" in note for note in notes)
    (parts / "chunk-000000.npz").write_bytes(b"not a zip")
    notes.clear()
    again = embed_in_chunks(checkpoint, data, output, chunk_size=16, notes=notes,
                            **OPTIONS)
    assert any("chunk 0" in n and "damaged" in n and "embedding it again" in n for n in notes)
    np.testing.assert_allclose(again.vectors, whole.vectors, atol=1e-6)


def interrupted(tmp_path, checkpoint, data, monkeypatch, chunk_size=8):
    """An embedding of four chunks that stopped after two, with parts 0 and 1 on disk."""
    real = chunks.embed_dataset
    calls = []

    def failing_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(chunks, "embed_dataset", failing_third)
    output = tmp_path / "v.npz"
    with pytest.raises(Crash):
        embed_in_chunks(checkpoint, data, output, chunk_size=chunk_size, **OPTIONS)
    monkeypatch.setattr(chunks, "embed_dataset", real)
    return output, parts_folder(output)


def rewrite_part(path: Path, **changes) -> None:
    with np.load(path, allow_pickle=False) as part:
        contents = {key: part[key] for key in part.files}
    contents.update(changes)
    np.savez(path, **contents)


@pytest.mark.parametrize("spoil", ["neighbour-copy", "other-vectors", "other-dimension",
                                   "no-record"])
def test_a_resume_never_joins_a_part_it_cannot_verify(tmp_path, trained, monkeypatch, spoil):
    data, checkpoint = trained
    output, parts = interrupted(tmp_path, checkpoint, data, monkeypatch)
    first, second = parts / "chunk-000000.npz", parts / "chunk-000001.npz"
    if spoil == "neighbour-copy":
        second.write_bytes(first.read_bytes())
    else:
        with np.load(second) as part:
            vectors = part["vectors"]
        if spoil == "other-vectors":
            rewrite_part(second, vectors=vectors[::-1].copy())
        elif spoil == "other-dimension":
            rewrite_part(second, vectors=np.zeros((len(vectors), 7), np.float32))
        else:
            with np.load(second) as part:
                np.savez(second, **{k: part[k] for k in part.files if k != "record"})
    notes = []
    resumed = embed_in_chunks(checkpoint, data, output, chunk_size=8, notes=notes,
                              **OPTIONS)
    assert any(n.startswith("chunk 1 ") and "embedding it again" in n for n in notes), notes
    whole = embed_folder(checkpoint, data, **OPTIONS)
    assert resumed.paths == whole.paths and len(set(resumed.paths)) == len(resumed.paths)
    np.testing.assert_allclose(resumed.vectors, whole.vectors, atol=1e-6)


def test_a_parts_path_ascension_did_not_make_is_refused_and_left_alone(tmp_path, trained):
    data, checkpoint = trained
    output = tmp_path / "v.npz"
    parts_folder(output).write_text("my notes")
    result = runner.invoke(app, ["embed", str(checkpoint), str(data), "-o", str(output),
                                 "--workers", "0"])
    assert result.exit_code == 2 and "is a file" in result.output, result.output
    assert parts_folder(output).read_text() == "my notes"
    parts_folder(output).unlink()
    parts_folder(output).mkdir()
    (parts_folder(output) / "thesis.tex").write_text("years of work")
    result = runner.invoke(app, ["embed", str(checkpoint), str(data), "-o", str(output),
                                 "--workers", "0"])
    assert result.exit_code == 2 and "did not write" in result.output, result.output
    assert (parts_folder(output) / "thesis.tex").read_text() == "years of work"


def test_the_command_removes_its_parts_and_reports_a_resume(tmp_path, trained):
    data, checkpoint = trained
    output = tmp_path / "v.npz"
    parts = parts_folder(output)
    result = runner.invoke(app, ["embed", str(checkpoint), str(data), "-o", str(output),
                                 "--chunk-size", "10", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert not parts.exists() and len(load_vectors(output)) == 32


def test_two_torchrun_processes_write_the_single_process_file(tmp_path, trained):
    data, checkpoint = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [str(checkpoint), str(data), "--chunk-size", "5", "--workers", "0",
              "--device", "cpu", "--batch-size", "4"]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "ascension_cli", "embed", *common, "-o", str(tmp_path / "two.npz")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count("wrote 32 labelled vectors") == 1  # rank 0 writes and reports
    one = subprocess.run(
        [sys.executable, "-m", "ascension_cli", "embed", *common, "-o", str(tmp_path / "one.npz")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    a, b = load_vectors(tmp_path / "two.npz"), load_vectors(tmp_path / "one.npz")
    assert a.paths == b.paths and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)
    assert not parts_folder(tmp_path / "two.npz").exists()
