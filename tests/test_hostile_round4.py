"""Hostile inputs, round four: text from the data printed as it is, item ids kept as given and
stored variable-length, loss options checked against the data, open-set figures with a separate
gallery, the service's answers while its catalogue is damaged, strict JSON, and hand-edited
calibrations."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from ascension_cli import api
from ascension_cli.catalog.store import load_catalog, write_catalog
from ascension_cli.cli.app import app
from tests.test_catalog import train_tiny

runner = CliRunner()
# Names a shop may give, and names meant to break a console: markup, emoji codes, escapes.
CLASSES = {"circle": "[/x]", "square": "[bold]b", "triangle": "k\x1b[31m\x07", "cross": ":x:"}
ITEMS = {"circle": "[/bad]", "square": "[NEW] j", "triangle": "t\x1b[2J", "cross": ""}


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("round4")
    data, checkpoint = train_tiny(root)
    return root, data, checkpoint


def manifest(path, data, rows=None):
    """A manifest of ``data`` with the hostile class names and item ids (or ``rows``)."""
    if rows is None:
        rows = [(p, CLASSES[p.parent.name], ITEMS[p.parent.name])
                for p in sorted(data.rglob("*.png"))]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "item_id"])
        writer.writerows([str(p), label, item] for p, label, item in rows)
    return path


def shown(text: str) -> str:
    return text.replace("\x1b", "\\x1b").replace("\x07", "\\x07")


def test_text_from_the_data_is_printed_as_it_is_by_every_command(trained, tmp_path):
    _, data, checkpoint = trained
    table = manifest(tmp_path / "m.csv", data)
    built = invoke("index", checkpoint, table, "-o", tmp_path / "cat", "--workers", "0",
                   "--check")
    searched = invoke("search", tmp_path / "cat", data / "circle", "--k", "2", "--workers", "0")
    grouped = invoke("search", tmp_path / "cat", data / "square" / "001.png", "--group-by",
                     "item", "--workers", "0")
    embedded = invoke("embed", checkpoint, table, "-o", tmp_path / "v.npz", "--workers", "0")
    evaluated = invoke("eval", tmp_path / "v.npz", "--unknown-classes", "0.5")
    reported = invoke("report", tmp_path / "v.npz", "-o", tmp_path / "r.html")
    shutil.copytree(data / "circle", tmp_path / "more" / "[y]")
    added = invoke("index", checkpoint, tmp_path / "more", "-o", tmp_path / "cat", "--add",
                   "--workers", "0")
    for result in (built, searched, grouped, embedded, evaluated, reported, added):
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
    assert "[/x]" in searched.output and "[/bad]" in searched.output
    assert "[NEW] j" in grouped.output and "[bold]b" in grouped.output
    for name in CLASSES.values():  # the per-class table holds every class, escaped
        assert shown(name) in evaluated.output
    assert "[y] [[y]] ~ [/bad] [[/x]]" in added.output  # the onboarding warning
    confusing = invoke("search", tmp_path / "cat", data / "triangle" / "000.png", "--k", "1",
                       "--workers", "0")
    assert shown("t\x1b[2J") in confusing.output
    assert "open set: 2 class(es) held out" in evaluated.output


def test_training_on_class_folders_with_hostile_names_prints_them_as_they_are(tmp_path):
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "data", classes=3, per_class=6)
    for old, new in zip(sorted(p for p in data.iterdir()), ["[b]", "[bold]c", "k\x1b[31m"],
                        strict=True):
        old.rename(data / new)
    result = invoke("train", data, "--model", "test_convnext", "--no-pretrained",
                    "--image-size", "32", "--batch-size", "4", "--target-batch", "8",
                    "--samples-per-class", "2", "--epochs", "1", "--workers", "0",
                    "--save-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "done: 1 epoch(s)" in result.output
    manifested = invoke("manifest", data, "-o", tmp_path / "m.csv")
    assert manifested.exit_code == 0 and "\x1b" not in manifested.output


def test_an_empty_item_id_is_the_class_and_one_item_under_two_classes_is_refused(
        trained, tmp_path):
    _, data, checkpoint = trained
    photos = [data / "circle" / "000.png", data / "square" / "000.png"]
    table = manifest(tmp_path / "m.csv", data, [(p, p.parent.name, "") for p in photos])
    catalog = api.index(checkpoint, table, tmp_path / "cat", workers=0).catalog
    assert catalog.items() == ["circle", "square"]  # not one item "000.png" of two classes

    clash = manifest(tmp_path / "clash.csv", data,
                     [(photos[0], "circle", "sku-1"), (photos[1], "square", "sku-1")])
    refused = invoke("index", checkpoint, clash, "-o", tmp_path / "other", "--workers", "0")
    assert refused.exit_code == 2
    assert "item_id 'sku-1' is filed under two classes, 'circle' and 'square'" in refused.output
    # An add whose class is another class's item: the same item under two classes.
    labelled = manifest(tmp_path / "l.csv", data, [(photos[0], "circle", "sku-1")])
    api.index(checkpoint, labelled, tmp_path / "items", workers=0)
    (tmp_path / "new" / "sku-1").mkdir(parents=True)
    shutil.copy(photos[1], tmp_path / "new" / "sku-1")
    again = invoke("index", checkpoint, tmp_path / "new", "-o", tmp_path / "items", "--add",
                   "--workers", "0")
    assert again.exit_code == 2 and "item 'sku-1' would be filed under two classes" in (
        again.output)
    assert len(load_catalog(tmp_path / "items")) == 1  # nothing written


def test_catalogue_strings_are_kept_whole_and_stored_variable_length(trained, tmp_path):
    _, data, checkpoint = trained
    table = manifest(tmp_path / "m.csv", data, [
        (p, p.parent.name, f"{p.parent.name}-{p.stem}") for p in sorted(data.rglob("*.png"))])
    catalog = api.index(checkpoint, table, tmp_path / "cat", workers=0).catalog
    items_file = lambda c: c.directory / c.files["items"]  # noqa: E731
    before = items_file(catalog).stat().st_size
    given = [*catalog.items()]
    given[0], given[1] = "x" * 10_000, "square-0\0"
    grown = write_catalog(load_catalog(tmp_path / "cat").__class__(
        **{**vars(load_catalog(tmp_path / "cat")), "item_ids": given}), None)
    after = items_file(grown).stat().st_size
    assert after - before < 11_000, (before, after)  # about its own size, not 32 x 10,000
    assert load_catalog(tmp_path / "cat").items() == given  # the NUL kept


def test_vectors_files_keep_their_strings_whole(trained, tmp_path):
    from ascension_cli.embedding.vectors import Vectors, load_vectors, save_vectors

    names = ["a\0", "x" * 5000, "é[/x]", "\udcff.png"]
    vectors = Vectors(np.eye(4, dtype=np.float32), np.arange(4), names, ["c\0"] * 4,
                      failed=["gone\0"], item_ids=names)
    save_vectors(tmp_path / "v.npz", vectors)
    read = load_vectors(tmp_path / "v.npz")
    assert read.paths == read.item_ids == names and read.failed == ["gone\0"]
    assert (tmp_path / "v.npz").stat().st_size < 4 * 5000  # not every row padded to 5000


def test_open_set_with_a_separate_gallery_counts_its_missing_classes_as_unknown():
    from ascension_cli.retrieval.openset import evaluate_open_set

    rng = np.random.default_rng(0)
    centres = np.eye(3, 8, dtype=np.float32)
    queries = np.repeat(centres, 4, axis=0) + 0.05 * rng.standard_normal((12, 8))
    query_labels = np.repeat([0, 1, 2], 4)
    gallery = np.repeat(centres[:2], 3, axis=0) + 0.05 * rng.standard_normal((6, 8))
    normal = lambda v: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)  # noqa
    report = evaluate_open_set(normal(queries), query_labels, normal(gallery),
                               np.repeat([0, 1], 3), np.array([1]), ["a", "b", "c"],
                               lacking=["c"])
    # Class 1 is held out, class 2 is not in the gallery: 4 known, 8 unknown.
    assert (report.known_queries, report.unknown_queries) == (4, 8)
    assert report.unknown_classes == ["b", "c"] and report.fnmr == 0.0


@pytest.mark.parametrize("arguments, expected", [
    (["calibrate", "CAT", "IMAGES", "--seed", "-1"], "--seed"),
    (["eval", "VECTORS", "--target-fmr", "0.1"], "--target-fmr applies to the open-set"),
    (["eval", "VECTORS", "--seed", "3"], "--seed applies to the open-set"),
    (["train", "DATA", "--temperature", "1e-45"], "--temperature"),
    (["train", "DATA", "--loss", "pml:ProxyAnchorLoss", "--loss-option", "margin=nan"],
     "give a finite number"),
    (["train", "DATA", "--loss", "pml:ProxyAnchorLoss", "--loss-option", "alpha=inf"],
     "give a finite number"),
])
def test_options_that_cannot_work_are_refused_in_one_line(trained, tmp_path, arguments,
                                                         expected):
    root, data, checkpoint = trained
    if not (root / "cat").exists():
        api.index(checkpoint, data, root / "cat", workers=0)
        api.embed(checkpoint, data, root / "v.npz", workers=0)
    where = {"CAT": root / "cat", "IMAGES": data, "VECTORS": root / "v.npz", "DATA": data}
    result = invoke(*[where.get(a, a) for a in arguments])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert result.output.count("error:") == 1


def test_a_loss_option_that_does_not_fit_the_data_is_refused_before_training(tmp_path):
    pytest.importorskip("pytorch_metric_learning")
    from ascension_cli.errors import ConfigError
    from ascension_cli.train.loop import train
    from tests.conftest import make_dataset
    from tests.test_train import config

    data = make_dataset(tmp_path / "data", classes=6, per_class=6)
    for option, expected in (("num_classes=2", "on the data's 6 classes"),
                             ("margin=1e308", "every step would be skipped")):
        with pytest.raises(ConfigError, match=expected):
            train(config(data, tmp_path / option, loss="pml:ProxyAnchorLoss",
                         loss_option=[option], epochs=1))
        assert not (tmp_path / option / "last.pt").exists()


def test_the_service_answers_503_without_server_paths_while_its_catalogue_is_damaged(
        trained, tmp_path):
    pytest.importorskip("fastapi")
    requests = pytest.importorskip("requests")
    from tests.test_serve import Server

    _, data, checkpoint = trained
    api.index(checkpoint, data, tmp_path / "cat", workers=0)
    meta = tmp_path / "cat" / "catalog.json"
    text = meta.read_text()
    server = Server(tmp_path / "cat")
    try:
        info = requests.get(server.url + "/info", timeout=30).json()
        assert str(tmp_path) not in json.dumps(info)
        found = requests.post(server.url + "/search", timeout=60, files={
            "image": ("q.png", (data / "circle" / "000.png").read_bytes())}).json()
        assert str(tmp_path) not in json.dumps(found)
        for damage in (text[: len(text) // 2],
                       text.replace('"count"', '"calibration": {"threshold": 1' + "0" * 5000
                                    + '}, "count"')):
            meta.write_text(damage)
            for method, route in (("get", "/info"), ("post", "/search"),
                                  ("get", "/items/0/image")):
                answer = getattr(requests, method)(server.url + route, timeout=30, files={
                    "image": ("q.png", (data / "circle" / "000.png").read_bytes())}
                    if method == "post" else None)
                assert answer.status_code == 503, (route, answer.text)
                assert str(tmp_path) not in answer.text and "error" in answer.json()
        meta.write_text(text)
        assert requests.get(server.url + "/info", timeout=30).status_code == 200
    finally:
        server.stop()


def strict(text: str):
    """JSON as a strict parser reads it (browsers, jq, Go): NaN and Infinity refused."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_json_files_hold_null_with_a_reason_never_nan(trained, tmp_path):
    from ascension_cli.retrieval.report import write_json

    write_json(tmp_path / "m.json", {"open_set": {"fnmr": math.nan, "fmr": 0.0},
                                     "recall": [math.inf]})
    written = strict((tmp_path / "m.json").read_text())
    assert written["open_set"]["fnmr"] is None and written["recall"] == [None]
    assert "no known queries" in written["open_set"]["null_reasons"]["fnmr"]

    _, data, checkpoint = trained
    api.index(checkpoint, data / "circle", tmp_path / "cat", workers=0)
    unknown_only = tmp_path / "unknown"
    shutil.copytree(data / "square", unknown_only / "square")
    result = invoke("calibrate", tmp_path / "cat", unknown_only, "--workers", "0")
    assert result.exit_code == 0, result.output
    calibration = strict((tmp_path / "cat" / "catalog.json").read_text())["calibration"]
    assert calibration["fnmr"] is None and "fnmr" in calibration["null_reasons"]
    # The reason travels with the figure when the catalogue is written again.
    api.index(checkpoint, data / "triangle", tmp_path / "cat", add=True, workers=0)
    again = strict((tmp_path / "cat" / "catalog.json").read_text())["calibration"]
    assert again["null_reasons"] == calibration["null_reasons"]


@pytest.mark.parametrize("threshold", [True, "0.5", 2.0, None, [0.5]])
def test_a_hand_edited_calibration_that_cannot_be_used_is_said_to_be_ignored(
        trained, tmp_path, threshold):
    _, data, checkpoint = trained
    api.index(checkpoint, data, tmp_path / "cat", workers=0)
    meta_path = tmp_path / "cat" / "catalog.json"
    meta = json.loads(meta_path.read_text())
    meta["calibration"] = {"threshold": threshold, "target_fmr": 0.01}
    meta_path.write_text(json.dumps(meta))
    catalog = load_catalog(tmp_path / "cat")
    assert catalog.threshold is None and "is ignored" in catalog.calibration_note()
    result = invoke("search", tmp_path / "cat", data / "circle" / "000.png", "--workers", "0")
    assert result.exit_code == 0 and result.output.count("is ignored") == 1, result.output
    found = api.search(tmp_path / "cat", data / "circle" / "000.png", workers=0)[0]
    assert not found.unknown and found.predicted == "circle"  # no threshold applied


def test_calibrating_on_the_catalogue_s_own_photos_is_warned_of(trained, tmp_path):
    _, data, checkpoint = trained
    known = tmp_path / "known"
    for name in ("circle", "square", "triangle"):
        shutil.copytree(data / name, known / name)
    api.index(checkpoint, known, tmp_path / "cat", workers=0)
    result = invoke("calibrate", tmp_path / "cat", data, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "known photos are in the catalogue already" in result.output
    assert load_catalog(tmp_path / "cat").calibration["warnings"]
