"""`ascension catalog upgrade` and `rollback`: a model trained longer on the same photos passes
the quality gate, an untrained one is refused with both figures said, a forced switch then a
rollback answers exactly as before, and a running service follows the switch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from ascension_cli import api
from ascension_cli.catalog.store import load_catalog
from ascension_cli.cli.app import app
from ascension_cli.config import TrainConfig
from ascension_cli.embedding.vectors import sha256_of
from ascension_cli.train.loop import train
from tests.conftest import make_dataset
from tests.test_calibrate import split_photos

runner = CliRunner()


def checkpoint(root: Path, data: Path, name: str, epochs: int, lr: float = 6e-4) -> Path:
    train(TrainConfig(data_root=data, save_dir=root / name, model="test_convnext",
                      pretrained=False, image_size=32, batch_size=4, target_batch=8,
                      samples_per_class=2, epochs=epochs, warmup_epochs=0, workers=0,
                      val_fraction=0.25, seed=0, lr=lr))
    return root / name / "last.pt"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The catalogue's model (2 epochs), one trained longer on the same photos (6 epochs) and
    one that learnt nothing (an LR of 1e-12), with the catalogue's and calibration photos."""
    root = tmp_path_factory.mktemp("upgrade")
    data = make_dataset(root / "data", classes=4, per_class=8)
    known, held = split_photos(data, root)
    return {"data": data, "known": known, "held": held,
            "current": checkpoint(root, data, "current", 2),
            "longer": checkpoint(root, data, "longer", 6),
            "untrained": checkpoint(root, data, "untrained", 1, lr=1e-12)}


def calibrated(models: dict, place, name: str = "cat") -> str:
    """A catalogue of the known photos, calibrated, at ``place(name)`` (``tests/stores.py``)."""
    catalog = place(name)
    api.index(models["current"], models["known"], catalog, workers=0, **place.options)
    api.calibrate(catalog, models["held"], target_fmr=0.25, workers=0)
    return catalog


def answers(catalog: Path, queries: list[Path]) -> list:
    return [(r.predicted, r.unknown, [(m.path, m.class_name, m.similarity) for m in r.matches])
            for r in api.search(catalog, queries, k=5, workers=0)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_the_gate_passes_a_better_model_and_refuses_an_untrained_one(models, place, tmp_path):
    catalog = calibrated(models, place)
    before = load_catalog(catalog)
    changes = len(api.history(catalog))
    refused = invoke("catalog", "upgrade", catalog, models["untrained"], "--workers", "0")
    assert refused.exit_code != 0 and "Traceback" not in refused.output, refused.output
    assert "worse on" in refused.output and "now," in refused.output, refused.output
    assert "new" in refused.output and "--force" in refused.output
    unchanged = load_catalog(catalog)
    assert unchanged.generation == before.generation and len(api.history(catalog)) == changes
    assert unchanged.checkpoint_sha256 == before.checkpoint_sha256

    passed = invoke("catalog", "upgrade", catalog, models["longer"], "--workers", "0",
                    "--json", tmp_path / "gate.json")
    assert passed.exit_code == 0, passed.output
    assert "current model: Recall@1" in passed.output and "new model: Recall@1" in passed.output
    gate = json.loads((tmp_path / "gate.json").read_text())["gate"]
    assert gate["passed"] and gate["after"]["fnmr"] <= gate["before"]["fnmr"] + 0.01
    upgraded = load_catalog(catalog)
    assert upgraded.checkpoint_sha256 == sha256_of(models["longer"])
    assert upgraded.calibration["threshold"] == gate["after"]["threshold"]  # recalibrated
    if place.folder:
        assert upgraded.files["model"] == f"model-{upgraded.generation:06d}.pt"
    assert not list(upgraded.directory.glob(".upgrade*"))  # its parts went
    history = api.history(catalog)
    assert history[-1]["action"] == "upgrade" and history[-1]["gate"]["passed"]
    assert history[-1]["photos"] == len(upgraded)


def test_a_forced_upgrade_then_a_rollback_answers_exactly_as_before(models, place, tmp_path):
    catalog = calibrated(models, place)
    queries = sorted(models["held"].glob("*/*.png"))[:6]
    before, meta = answers(catalog, queries), load_catalog(catalog)
    forced = invoke("catalog", "upgrade", catalog, models["untrained"], "--workers", "0",
                    "--force")
    assert forced.exit_code == 0 and "worse on" in forced.output, forced.output
    assert answers(catalog, queries) != before
    rolled = invoke("catalog", "rollback", catalog)
    assert rolled.exit_code == 0, rolled.output
    assert answers(catalog, queries) == before  # the same model, vectors and threshold
    back = load_catalog(catalog)
    assert back.checkpoint_sha256 == meta.checkpoint_sha256
    assert back.calibration == meta.calibration
    if place.folder:
        assert back.generation == meta.generation + 2
    again = invoke("catalog", "rollback", catalog)
    assert again.exit_code != 0 and "nothing to roll back" in again.output
    assert [e["action"] for e in api.history(catalog)][-2:] == ["upgrade", "rollback"]
    # A change after an upgrade drops its rollback point, and its files with it.
    assert invoke("catalog", "upgrade", catalog, models["longer"], "--workers", "0"
                  ).exit_code == 0
    photo = load_catalog(catalog).paths[0]
    assert invoke("catalog", "remove", catalog, "--photo", photo).exit_code == 0
    assert "nothing to roll back" in invoke("catalog", "rollback", catalog).output
    if place.folder:
        live = json.loads((Path(catalog) / "catalog.json").read_text())
        models_on_disk = sorted(p.name for p in Path(catalog).glob("model*.pt"))
        assert models_on_disk == sorted({live["files"]["model"],
                                         live["previous_files"]["model"]})


def test_an_uncalibrated_catalogue_needs_photos_or_force(models, place, tmp_path):
    catalog = place("cat")
    api.index(models["current"], models["known"], catalog, workers=0, **place.options)
    result = invoke("catalog", "upgrade", catalog, models["longer"], "--workers", "0")
    assert result.exit_code != 0 and "nothing to measure" in result.output
    result = invoke("catalog", "upgrade", catalog, models["longer"], "--workers", "0",
                    "--photos", models["held"])
    assert result.exit_code == 0, result.output
    same = invoke("catalog", "upgrade", catalog, models["longer"], "--workers", "0")
    assert same.exit_code != 0 and "already answers with this model" in same.output


def test_an_interrupted_upgrade_resumes_from_its_parts(models, place, tmp_path, monkeypatch):
    from ascension_cli.catalog import upgrade
    from ascension_cli.embedding import pipeline

    catalog = calibrated(models, place)
    home = load_catalog(catalog).directory  # the folder, or the shared store
    chunks = []
    real = pipeline.embed_dataset

    def one_chunk_then_stop(*args, **kwargs):
        if len(chunks) == 1:
            raise KeyboardInterrupt
        chunks.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(upgrade, "CHUNK", 4)
    monkeypatch.setattr(pipeline, "embed_dataset", one_chunk_then_stop)
    with pytest.raises(KeyboardInterrupt):
        api.upgrade(catalog, models["longer"], workers=0)
    parts = list(home.glob(".upgrade*/vectors.npz.parts/*"))
    assert parts and load_catalog(catalog).checkpoint_sha256 == sha256_of(models["current"])
    embedded = []
    monkeypatch.setattr(pipeline, "embed_dataset",
                        lambda *a, **k: embedded.append(len(a[1])) or real(*a, **k))
    api.upgrade(catalog, models["longer"], workers=0)
    assert load_catalog(catalog).checkpoint_sha256 == sha256_of(models["longer"])
    assert sum(embedded[:-2]) < len(load_catalog(catalog))  # the first chunk was not redone


def test_a_running_service_follows_the_switch_and_the_rollback(models, place, tmp_path):
    pytest.importorskip("fastapi")
    from tests.test_serve import Server, post

    catalog = calibrated(models, place)
    query = sorted(models["held"].glob("*/*.png"))[0]
    server = Server(catalog)
    try:
        first = post(server, query, k="3").json()["results"][0]
        api.upgrade(catalog, models["untrained"], workers=0, force=True)
        switched = post(server, query, k="3").json()["results"][0]
        assert switched["matches"] != first["matches"]
        info = requests.get(server.url + "/info", timeout=10).json()
        assert info["history"]["last"][0]["action"] == "upgrade"
        api.rollback(catalog)
        assert post(server, query, k="3").json()["results"][0] == first
    finally:
        server.stop()
