"""`ascension embed` and `ascension eval`: file format, end to end, and the error paths."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ascension_cli.cli.app import app
from ascension_cli.config import TrainConfig
from ascension_cli.embedding.vectors import Vectors, load_vectors, save_vectors, sha256_of
from ascension_cli.train.loop import train
from tests.conftest import make_dataset

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    data = make_dataset(root / "data", classes=4, per_class=8)
    train(TrainConfig(
        data_root=data, save_dir=root / "run", model="test_convnext", pretrained=False,
        image_size=32, batch_size=4, target_batch=8, samples_per_class=2, epochs=1,
        warmup_epochs=0, workers=0, val_fraction=0.25, head="mlp",  # so head != backbone
    ))
    return root, data, root / "run" / "last.pt"


def test_embed_writes_the_documented_file(trained, tmp_path):
    root, data, checkpoint = trained
    (data / "circle" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    try:
        result = invoke("embed", checkpoint, data, "-o", tmp_path / "v.npz", "--workers", "0",
                        "--index", tmp_path / "v.faiss")
    finally:
        (data / "circle" / "corrupt.png").unlink()
    assert result.exit_code == 0, result.output
    assert "1 unreadable image(s) skipped" in result.output
    vectors = load_vectors(tmp_path / "v.npz")
    assert vectors.vectors.shape == (32, 64) and vectors.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors.vectors, axis=1), 1, atol=1e-5)
    assert vectors.class_names == ["circle", "cross", "square", "triangle"]
    assert vectors.paths[0] == "circle/000.png" and vectors.labels[0] == 0
    assert vectors.paths == sorted(vectors.paths)  # deterministic order
    assert vectors.failed == ["circle/corrupt.png"]
    assert vectors.model_name == "test_convnext" and vectors.feature_kind == "backbone"
    assert vectors.checkpoint_sha256 == sha256_of(checkpoint)

    import faiss

    index = faiss.read_index(str(tmp_path / "v.faiss"))
    assert index.ntotal == 32


def test_embed_layout_flag_changes_speed_not_vectors(trained, tmp_path):
    _, data, checkpoint = trained
    for name, flags in (("nhwc", ()), ("nchw", ("--no-channels-last",))):
        result = invoke("embed", checkpoint, data, "-o", tmp_path / f"{name}.npz",
                        "--precision", "fp32", *flags)
        assert result.exit_code == 0, result.output
    nhwc, nchw = load_vectors(tmp_path / "nhwc.npz"), load_vectors(tmp_path / "nchw.npz")
    assert nhwc.paths == nchw.paths
    np.testing.assert_allclose(nhwc.vectors, nchw.vectors, rtol=0, atol=1e-5)


def test_embed_head_features_and_flat_folder(trained, tmp_path):
    root, data, checkpoint = trained
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((data / "cross").iterdir())[:3]:
        (flat / path.name).write_bytes(path.read_bytes())
    result = invoke("embed", checkpoint, flat, "-o", tmp_path / "f.npz", "--features", "head",
                    "--workers", "0")
    assert result.exit_code == 0, result.output
    vectors = load_vectors(tmp_path / "f.npz")
    assert vectors.vectors.shape == (3, 128)
    assert vectors.labels.tolist() == [-1, -1, -1] and not vectors.labelled
    assert vectors.feature_kind == "head"


def test_embed_matches_the_model_directly(trained, tmp_path):
    from ascension_cli.data.augment import eval_transform
    from ascension_cli.data.folder import load_image
    from ascension_cli.model.checkpoint import load_model

    root, data, checkpoint = trained
    assert invoke("embed", checkpoint, data, "-o", tmp_path / "v.npz", "--workers", "0",
                  "--precision", "fp32").exit_code == 0
    vectors = load_vectors(tmp_path / "v.npz")
    model, spec, _ = load_model(checkpoint)
    transform = eval_transform(spec.image_size, spec.mean, spec.std, spec.crop_pct)
    image = transform(image=load_image(data / vectors.paths[5]))["image"]
    with torch.no_grad():
        expected = model.eval().features(torch.from_numpy(image.transpose(2, 0, 1))[None])
    assert np.allclose(vectors.vectors[5], expected.numpy()[0], atol=1e-5)


def test_eval_from_vectors_and_the_checkpoint_shortcut_agree(trained, tmp_path):
    root, data, checkpoint = trained
    assert invoke("embed", checkpoint, data, "-o", tmp_path / "v.npz", "--workers", "0",
                  "--precision", "fp32").exit_code == 0
    first = invoke("eval", tmp_path / "v.npz", "--json", tmp_path / "a.json", "--k", "1,3")
    second = invoke("eval", checkpoint, data, "--json", tmp_path / "b.json", "--k", "1,3",
                    "--workers", "0", "--precision", "fp32")
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["recall_at_k"] == b["recall_at_k"]
    assert set(a) >= {"version", "index", "queries", "excluded_queries", "recall_at_k",
                      "precision_at_1", "r_precision", "map_at_r", "per_class_recall_at_1",
                      "approximate_recall_vs_exact", "recolor"}
    assert a["queries"] == 32 and list(a["per_class_recall_at_1"]) == [
        "circle", "cross", "square", "triangle"]
    assert "Recall@3" in first.output and "MAP@R" in first.output


def test_eval_query_gallery_recolor_and_show(trained, tmp_path):
    root, data, checkpoint = trained
    queries = make_dataset(tmp_path / "queries", classes=3, per_class=3, seed=5)
    result = invoke("embed", checkpoint, data, "-o", tmp_path / "g.npz", "--workers", "0")
    assert result.exit_code == 0
    assert invoke("embed", checkpoint, queries, "-o", tmp_path / "q.npz",
                  "--workers", "0").exit_code == 0
    result = invoke("eval", tmp_path / "q.npz", "--gallery", tmp_path / "g.npz", "--show", "2",
                    "-o", tmp_path / "grid.png", "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").stat().st_size > 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["queries"] == 9  # no self-exclusion: 9 queries, all with gallery matches

    recolored = invoke("eval", checkpoint, queries, "--recolor", "--workers", "0",
                       "--json", tmp_path / "r.json")
    assert recolored.exit_code == 0, recolored.output
    assert set(json.loads((tmp_path / "r.json").read_text())["recolor"]) == {
        "hue90", "hue180", "grayscale"}

    # With --gallery the recoloured queries are searched in that gallery, like the clean ones.
    # A gallery of circles alone: every answerable query (a circle) finds a circle first, clean
    # or recoloured; searched among the queries instead, they would also meet squares.
    circles = make_dataset(tmp_path / "circles", classes=1, per_class=4, seed=9)
    assert invoke("embed", checkpoint, circles, "-o", tmp_path / "c.npz",
                  "--workers", "0").exit_code == 0
    against_gallery = invoke("eval", checkpoint, queries, "--gallery", tmp_path / "c.npz",
                             "--recolor", "--workers", "0", "--json", tmp_path / "rg.json")
    assert against_gallery.exit_code == 0, against_gallery.output
    metrics = json.loads((tmp_path / "rg.json").read_text())
    assert metrics["queries"] == 3 and set(metrics["recall_at_k"].values()) == {1.0}
    for kind in ("hue90", "hue180", "grayscale"):
        assert metrics["recolor"][kind] == metrics["recall_at_k"]


def test_recoloured_queries_are_searched_where_the_clean_ones_were():
    from ascension_cli.retrieval.evaluate import evaluate, evaluate_recoloured

    # Each query's nearest gallery item is of another class; its nearest other query is of its
    # own class. Searched among the queries (the old mistake) the recoloured row would read 1.0.
    queries = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99]], np.float32)
    labels = np.array([0, 0, 1, 1])
    gallery = np.array([[0.9, 0.44], [0.44, 0.9]], np.float32)
    gallery_labels = np.array([1, 0])
    clean = evaluate(queries, labels, gallery, gallery_labels, ks=(1,))
    same = evaluate_recoloured(queries, labels, queries, gallery, gallery_labels, ks=(1,))
    assert clean.report.recall_at_k == same.report.recall_at_k == {1: 0.0}
    assert np.array_equal(same.neighbour_ids, clean.neighbour_ids)

    # Without a gallery: among the clean queries, each query's own clean vector left out.
    alone = evaluate(queries, labels, ks=(1,))
    alone_recoloured = evaluate_recoloured(queries, labels, queries, ks=(1,))
    assert alone.report.recall_at_k == alone_recoloured.report.recall_at_k == {1: 1.0}
    assert np.array_equal(alone_recoloured.neighbour_ids, alone.neighbour_ids)


def raw(path, content: bytes):
    path.write_bytes(content)
    return path


def write(path, **overrides):
    data = dict(vectors=np.eye(4, dtype=np.float32), labels=np.array([0, 0, 1, 1]),
                paths=["a", "b", "c", "d"], class_names=["x", "y"])
    data.update(overrides)
    save_vectors(path, Vectors(**data))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.npz", "file not found"),
        (lambda p: raw(p / "e.npz", b""), "(0 bytes) is not an Ascension vectors file"),
        (lambda p: raw(p / "t.npz", b"hello"), "(5 bytes) is not an Ascension vectors file"),
        (lambda p: write(p / "n.npz", vectors=np.full((4, 4), np.nan, np.float32)), "NaN"),
        (lambda p: write(p / "z.npz", vectors=np.zeros((0, 4), np.float32), labels=np.zeros(0),
                         paths=[]), "holds no vectors"),
        (lambda p: write(p / "u.npz", labels=np.full(4, -1)), "have no labels"),
    ],
)
def test_bad_vectors_end_in_one_line(tmp_path, make, message):
    result = invoke("eval", make(tmp_path))
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_dimension_mismatch_and_bad_k(tmp_path):
    queries = write(tmp_path / "q.npz")
    gallery = write(tmp_path / "g.npz", vectors=np.eye(4, 8, dtype=np.float32),
                    paths=["e", "f", "g", "h"])
    result = invoke("eval", queries, "--gallery", gallery)
    assert result.exit_code == 2 and "dimension mismatch" in result.output
    result = invoke("eval", queries, "--k", "0,5")
    assert result.exit_code == 2 and "invalid --k" in result.output


def test_checkpoint_without_image_root_and_bad_checkpoint(tmp_path):
    result = invoke("eval", tmp_path / "x.pt")
    assert result.exit_code == 2 and "needs IMAGE_ROOT" in result.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    images = make_dataset(tmp_path / "img", classes=2, per_class=2)
    result = invoke("embed", junk, images, "-o", tmp_path / "v.npz")
    assert result.exit_code == 2 and "(16 bytes) is not an Ascension checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_vectors_round_trip(tmp_path):
    original = Vectors(np.eye(3, dtype=np.float32), np.array([0, 1, 1]), ["a", "b/é.png", "c"],
                       ["x", "y"], "m", "abc", "head", "/root", ["bad.png"])
    save_vectors(tmp_path / "v.npz", original)
    loaded = load_vectors(tmp_path / "v.npz")
    assert np.array_equal(loaded.vectors, original.vectors)
    for field in ("paths", "class_names", "model_name", "checkpoint_sha256", "feature_kind",
                  "image_root", "failed"):
        assert getattr(loaded, field) == getattr(original, field), field
