"""Indexes for millions: sizing from the catalogue's size, the memory estimate against FAISS's
own bytes, recall against exact search on held-out vectors, and up-front refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from ascension_cli.catalog.store import load_catalog
from ascension_cli.cli.app import app
from ascension_cli.errors import ConfigError
from ascension_cli.retrieval.index import (
    INDEX_KINDS,
    MIN_IVFPQ,
    build_index,
    check_fits,
    plan_index,
    recall_against_exact,
    search,
)
from tests.test_catalog import train_tiny

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def clustered(count: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres, ten to a centre: how embeddings of many items (a few
    photos each) look."""
    rng = np.random.default_rng(seed)
    clusters = max(1, count // 10)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.35 * rng.normal(
        size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("count", [50, 10_000, 1_000_000, 100_000_000])
@pytest.mark.parametrize("dim", [64, 1280, 100])
def test_plans_follow_the_size(count, dim):
    plan = plan_index(count, dim, "ivfpq")
    assert plan.lists & (plan.lists - 1) == 0  # a power of two
    assert plan.lists * 39 <= max(count, 39)  # enough training vectors per list
    assert plan.lists <= 2 * np.sqrt(count)
    assert 1 <= plan.probes <= plan.lists
    assert dim % plan.code_bytes == 0 and plan.code_bytes <= 128
    assert plan.code_bytes >= min(128, dim // 8)  # no needless loss of precision
    assert plan.train_size == min(count, max(10_000, 50 * plan.lists))


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_memory_estimate_matches_faiss_and_recall_is_measured(kind):
    vectors = clustered(20_000, 64)
    plan = plan_index(len(vectors), 64, kind)
    index = build_index(vectors, kind, use_gpu=False, plan=plan)
    assert index.ntotal == len(vectors)
    stored = len(faiss.serialize_index(index))
    assert 0.7 * stored <= plan.memory_bytes <= 1.5 * stored, (plan.memory_bytes, stored)
    recall, sample, held_out = recall_against_exact(index, vectors, plan, k=10, sample=300)
    assert sample == 300 and held_out  # 20,000 vectors: the quantizers train on 10,000
    assert recall == 1.0 if kind == "flat" else recall > 0.7
    # The recall is what an independent brute force says.
    if kind == "ivfpq":
        rows = np.arange(0, 20_000, 97)[:50]
        found, _ = search(index, vectors[rows], 11)
        exact = np.argsort(-(vectors @ vectors[rows].T), axis=0)[:11].T
        overlap = np.mean([len((set(f) - {r}) & (set(e) - {r})) / 10
                           for f, e, r in zip(found, exact, rows, strict=True)])
        assert abs(overlap - recall) < 0.15


def test_refusals_name_the_estimate_and_what_fits():
    with pytest.raises(ConfigError, match=f"at least {MIN_IVFPQ:,} items"):
        check_fits(plan_index(500, 64, "ivfpq"), None)
    with pytest.raises(ConfigError, match=r"flat index needs about 4\.8 GiB.*ivfpq would need "
                       r"about 3\d\d\.\d MiB"):
        check_fits(plan_index(5_000_000, 256, "flat"), 2 * 2**30)
    check_fits(plan_index(5_000_000, 256, "ivfpq"), 64 * 2**30)  # fits: no error


def test_catalogue_index_kinds_and_the_memory_refusal(tmp_path, monkeypatch):
    data, checkpoint = train_tiny(tmp_path)
    result = invoke("index", checkpoint, data, "-o", tmp_path / "hnsw", "--kind", "hnsw",
                    "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "index: hnsw" in result.output and "recall@10 against exact search" in result.output
    meta = json.loads((tmp_path / "hnsw" / "catalog.json").read_text())
    assert meta["index"]["kind"] == "hnsw" and meta["dimension"] > 0
    searched = load_catalog(tmp_path / "hnsw", with_vectors=False)
    assert searched.vectors is None and searched.index_kind == "hnsw"
    found = invoke("search", tmp_path / "hnsw", data / "square" / "001.png", "--workers", "0",
                   "--json", tmp_path / "r.json")
    assert found.exit_code == 0, found.output
    best = json.loads((tmp_path / "r.json").read_text())["results"][0]["matches"][0]
    assert best["path"].endswith("square/001.png")
    # --add keeps the catalogue's kind.
    extra = tmp_path / "extra" / "square"
    extra.mkdir(parents=True)
    (extra / "new.png").write_bytes((data / "square" / "002.png").read_bytes())
    added = invoke("index", checkpoint, tmp_path / "extra", "-o", tmp_path / "hnsw", "--add",
                   "--workers", "0")
    assert added.exit_code == 0, added.output
    assert load_catalog(tmp_path / "hnsw").index_kind == "hnsw"
    # Too few items for ivfpq, and an index that does not fit: one line, nothing written.
    small = invoke("index", checkpoint, data, "-o", tmp_path / "pq", "--kind", "ivfpq")
    assert small.exit_code == 2 and "at least 10,000 items" in small.output
    monkeypatch.setattr("ascension_cli.catalog.build.available_memory", lambda: 1000)
    refused = invoke("index", checkpoint, data, "-o", tmp_path / "big", "--workers", "0")
    assert refused.exit_code == 2 and "more than 80% of the" in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "big").exists()


def test_eval_with_ivfpq_measures_its_recall_and_refuses_small_galleries(tmp_path):
    from ascension_cli.errors import VectorsError
    from ascension_cli.retrieval.evaluate import evaluate

    vectors = clustered(12_000, 32)
    labels = np.arange(12_000) // 10
    run = evaluate(vectors, labels, index_kind="ivfpq", approximate_sample=200)
    exact = evaluate(vectors, labels)
    assert 0.6 < run.approximate_recall <= 1.0
    assert abs(run.report.recall_at_k[1] - exact.report.recall_at_k[1]) < 0.1
    with pytest.raises(VectorsError, match="at least 10,000 vectors"):
        evaluate(vectors[:500], labels[:500], index_kind="ivfpq")


THREADS_AFTER_A_SEARCH = """
import numpy as np, torch
from ascension_cli.retrieval.index import build_index, search
vectors = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
search(build_index(vectors), vectors[:4], k=3)
print(torch.get_num_threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no thread count to change")
def test_a_search_keeps_the_threads_the_process_was_given():
    """FAISS and torch share one OpenMP pool: a validation search that set FAISS's threads to
    every core changed training's too (a run resumed under OMP_NUM_THREADS=1 then differed in
    the last bits from an uninterrupted one, whose first validation had raised them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", THREADS_AFTER_A_SEARCH], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1"]
