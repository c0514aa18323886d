"""CSV / Parquet manifests: reading, bad rows, `ascension manifest`, training on one, and the
query/gallery protocol of its flags (checked against a brute-force numpy evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from ascension_cli.cli.app import app
from ascension_cli.data.folder import scan_folder
from ascension_cli.data.manifest import read_manifest, scan_any, write_manifest
from ascension_cli.data.splits import training_data
from ascension_cli.embedding.vectors import Vectors, load_vectors, save_vectors
from ascension_cli.errors import DataError
from ascension_cli.retrieval.evaluate import evaluate_vectors
from tests.conftest import make_dataset

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_csv(path, text):
    path.write_text(text.strip() + "\n")
    return path


def test_reads_relative_and_absolute_paths_with_every_column(tmp_path):
    data = make_dataset(tmp_path / "data", classes=2, per_class=3)
    absolute = (data / "square" / "000.png").resolve()
    manifest = write_csv(tmp_path / "m.csv", f"""
path,label,split,is_query,is_gallery,item_id
data/circle/000.png,round,train,0,0,a
data/circle/001.png,round,val,true,false,
{absolute},boxy,test,1,1,c
""")
    scan = read_manifest(manifest)
    assert scan.classes == ["boxy", "round"]  # labels in sorted order
    assert scan.labels.tolist() == [1, 1, 0]
    assert scan.paths[2] == absolute and scan.paths[0] == (data / "circle/000.png").resolve()
    assert scan.splits.tolist() == ["train", "validation", "test"]
    assert scan.is_query.tolist() == [False, True, True]
    assert scan.is_gallery.tolist() == [False, False, True]
    assert scan.item_ids == ["a", "round", "c"]  # an empty item id is the default: the class
    assert scan.name(0) == "data/circle/000.png"


def test_parquet_round_trip_equals_csv(tmp_path):
    pytest.importorskip("pyarrow")
    data = make_dataset(tmp_path / "data", classes=3, per_class=4)
    rows = [{"path": f"data/{p.parent.name}/{p.name}", "label": p.parent.name,
             "split": "train", "is_query": "1", "is_gallery": "0"}
            for p in scan_folder(data).paths]
    write_manifest(tmp_path / "m.csv", rows)
    write_manifest(tmp_path / "m.parquet", rows)
    csv_scan = read_manifest(tmp_path / "m.csv")
    parquet_scan = read_manifest(tmp_path / "m.parquet")
    assert csv_scan.paths == parquet_scan.paths
    assert csv_scan.labels.tolist() == parquet_scan.labels.tolist()
    assert parquet_scan.is_query.all() and not parquet_scan.is_gallery.any()


def test_bad_rows_are_skipped_with_their_line_numbers(tmp_path):
    make_dataset(tmp_path / "data", classes=2, per_class=3)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty.png").write_bytes(b"")
    manifest = write_csv(tmp_path / "m.csv", """
path,label
data/circle/000.png,circle
data/circle/missing.png,circle
data/circle/001.png,
data/circle/000.png,circle
notes.txt,circle
empty.png,circle
,circle
data/square/000.png,square
""")
    scan = read_manifest(manifest)
    assert [p.name for p in scan.paths] == ["000.png", "000.png"]
    assert scan.skipped == {"missing file": 1, "empty label": 1, "path listed again": 1,
                            "not an image": 1, "empty file": 1, "empty path": 1}
    assert scan.skipped_lines["missing file"] == [3]
    assert scan.skipped_lines["path listed again"] == [5]
    summary = scan.skip_summary()
    assert "1 empty label (line 4)" in summary and "1 missing file (line 3)" in summary


@pytest.mark.parametrize("text, message", [
    ("path,label,colour\na.png,x,red", "unknown column(s) 'colour'"),
    ("path,name\na.png,x", "no label column"),
    ("path,label,split\ndata/circle/000.png,x,holdout", "line 2: split is 'holdout'"),
    ("path,label,is_query\ndata/circle/000.png,x,maybe", "line 2: is_query is 'maybe'"),
    ("path,label\ndata/circle/000.png,x,extra", "line 2: more cells than the 2 columns"),
    ("path,label\nnothing.png,x", "no usable rows (1 missing file)"),
    ("path,label", "no usable rows (the table is empty)"),
])
def test_problems_with_the_table_stop_with_the_line(tmp_path, text, message):
    make_dataset(tmp_path / "data", classes=1, per_class=1)
    with pytest.raises(DataError, match=None) as caught:
        read_manifest(write_csv(tmp_path / "m.csv", text))
    assert message in str(caught.value)


def test_manifest_command_converts_a_tree_with_a_seeded_split(tmp_path):
    data = make_dataset(tmp_path / "data", classes=4, per_class=10)
    out = tmp_path / "elsewhere" / "m.csv"
    result = invoke("manifest", data, "-o", out, "--val-fraction", "0.2",
                    "--test-fraction", "0.3", "--seed", "5")
    assert result.exit_code == 0, result.output
    assert "40 rows (4 classes; 20 train, 8 validation, 12 test)" in result.output
    scan, folder = read_manifest(out), scan_folder(data)
    order = np.argsort([str(p) for p in scan.paths])
    assert [scan.paths[i] for i in order] == [p.resolve() for p in folder.paths]
    assert scan.labels[order].tolist() == folder.labels.tolist()
    test = scan.splits == "test"
    assert (scan.is_query == test).all() and (scan.is_gallery == test).all()
    again = tmp_path / "again.csv"
    invoke("manifest", data, "-o", again, "--val-fraction", "0.2", "--test-fraction", "0.3",
           "--seed", "5")
    assert sorted(read_manifest(again).paths) == sorted(scan.paths)
    assert read_manifest(again).splits.tolist() == scan.splits.tolist()
    assert invoke("manifest", data, "-o", tmp_path / "m.txt").exit_code == 2


def test_training_reads_train_and_validation_rows_never_test(tmp_path):
    data = make_dataset(tmp_path / "data", classes=3, per_class=10)
    invoke("manifest", data, "-o", tmp_path / "m.csv")
    scan = read_manifest(tmp_path / "m.csv")
    loaded = training_data(tmp_path / "m.csv")
    assert sorted(loaded.train_index.tolist()) == np.flatnonzero(scan.splits == "train").tolist()
    validation = {scan.paths[i] for i in np.flatnonzero(scan.splits == "validation")}
    assert set(loaded.val_paths) == validation
    with pytest.raises(Exception, match="drop val_fraction"):
        training_data(tmp_path / "m.csv", val_fraction=0.2, fraction_given=True)
    write_csv(tmp_path / "no_split.csv", "path,label\n" + "\n".join(
        f"data/{p.parent.name}/{p.name},{p.parent.name}" for p in scan_folder(data).paths))
    plain = training_data(tmp_path / "no_split.csv", val_fraction=0.2, fraction_given=True)
    assert len(plain.train_index) == 24 and len(plain.val_paths) == 6


def test_scan_any_split_and_its_errors(tmp_path):
    data = make_dataset(tmp_path / "data", classes=2, per_class=10)
    invoke("manifest", data, "-o", tmp_path / "m.csv", "--test-fraction", "0.5")
    assert len(scan_any(tmp_path / "m.csv", "test")) == 10
    with pytest.raises(DataError, match="applies to a manifest"):
        scan_any(data, "test")
    write_csv(tmp_path / "plain.csv", "path,label\ndata/circle/000.png,circle")
    with pytest.raises(DataError, match="has no split column"):
        scan_any(tmp_path / "plain.csv", "test")


def brute_force(vectors, labels, query, gallery):
    """Recall@1 and MAP@R of the flagged queries against the flagged gallery, own row out."""
    gallery_rows = np.flatnonzero(gallery)
    recall, average_precision = [], []
    for q in np.flatnonzero(query):
        rows = gallery_rows[gallery_rows != q]
        order = rows[np.argsort(-(vectors[rows] @ vectors[q]), kind="stable")]
        hits = labels[order] == labels[q]
        r = int(hits.sum())
        recall.append(float(hits[0]))
        precision = np.cumsum(hits[:r]) / np.arange(1, r + 1)
        average_precision.append(float((precision * hits[:r]).sum() / r) if r else 0.0)
    return np.mean(recall), np.mean(average_precision)


def test_query_gallery_flags_follow_the_standard_protocol(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = rng.integers(0, 5, n)
    query = rng.random(n) < 0.6
    gallery = ~query | (rng.random(n) < 0.5)  # some rows are both: excluded from their own search
    data = Vectors(vectors, labels, [f"{i}.png" for i in range(n)], [str(c) for c in range(5)],
                   is_query=query, is_gallery=gallery, item_ids=[str(i) for i in range(n)])
    save_vectors(tmp_path / "v.npz", data)
    loaded = load_vectors(tmp_path / "v.npz")
    assert (loaded.is_query == query).all() and loaded.item_ids[3] == "3"
    run = evaluate_vectors(loaded, ks=(1,))
    expected_recall, expected_map = brute_force(vectors, labels, query, gallery)
    assert run.clean.report.recall_at_k[1] == pytest.approx(expected_recall)
    assert run.clean.report.map_at_r == pytest.approx(expected_map, abs=1e-6)
    assert len(run.queries) == query.sum() and len(run.searched) == gallery.sum()


def test_train_embed_eval_and_index_on_a_manifest(tmp_path):
    data = make_dataset(tmp_path / "data", classes=4, per_class=10)
    manifest = tmp_path / "m.csv"
    assert invoke("manifest", data, "-o", manifest, "--test-fraction", "0.25").exit_code == 0
    result = invoke("train", manifest, "--model", "test_convnext", "--no-pretrained",
                    "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--target-batch",
                    "8", "--samples-per-class", "2", "--workers", "0", "--save-dir",
                    tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "train / val" in result.output and "24 / 8" in result.output
    assert "test rows (not read)" in result.output
    checkpoint = tmp_path / "run" / "last.pt"
    direct = invoke("eval", checkpoint, manifest, "--json", tmp_path / "direct.json")
    assert direct.exit_code == 0, direct.output
    assert "12 queries" not in direct.output and "8 queries" in direct.output  # test rows only
    assert invoke("embed", checkpoint, manifest, "--split", "test", "-o",
                  tmp_path / "t.npz").exit_code == 0
    via_file = invoke("eval", tmp_path / "t.npz", "--json", tmp_path / "file.json")
    assert via_file.exit_code == 0, via_file.output
    import json
    first = json.loads((tmp_path / "direct.json").read_text())
    second = json.loads((tmp_path / "file.json").read_text())
    for key in ("recall_at_k", "map_at_r", "r_precision"):
        assert first[key] == pytest.approx(second[key], abs=1e-6)
    built = invoke("index", checkpoint, manifest, "--split", "test", "-o", tmp_path / "cat")
    assert built.exit_code == 0 and "8 items in 4 classes" in built.output, built.output


def test_a_manifest_as_val_root_gives_its_validation_rows(tmp_path):
    data = make_dataset(tmp_path / "data", classes=3, per_class=10)
    invoke("manifest", data, "-o", tmp_path / "m.csv")
    scan = read_manifest(tmp_path / "m.csv")
    loaded = training_data(data, val_root=tmp_path / "m.csv")
    assert set(loaded.val_paths) == {scan.paths[i]
                                     for i in np.flatnonzero(scan.splits == "validation")}
