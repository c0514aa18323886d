"""`ascension index`, `search` and `export`: a lookup of known items, and deployable models."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ascension_cli.catalog.search import Match, vote
from ascension_cli.catalog.store import load_catalog
from ascension_cli.cli.app import app
from ascension_cli.config import TrainConfig
from ascension_cli.model.checkpoint import load_model
from ascension_cli.train.loop import train
from tests.conftest import make_dataset

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def train_tiny(root, seed=0):
    data = make_dataset(root / "data", classes=4, per_class=8)
    train(TrainConfig(
        data_root=data, save_dir=root / "run", model="test_convnext", pretrained=False,
        image_size=32, batch_size=4, target_batch=8, samples_per_class=2, epochs=1,
        warmup_epochs=0, workers=0, val_fraction=0.25, seed=seed,
    ))
    return data, root / "run" / "last.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    data, checkpoint = train_tiny(root)
    return root, data, checkpoint


def test_index_then_search_finds_the_item_at_rank_1(trained, place, tmp_path):
    root, data, checkpoint = trained
    result = invoke("index", checkpoint, data, "-o", place("cat"), *place.shared,
                    "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "32 items in 4 classes (32 added)" in result.output
    if place.folder:
        meta = json.loads((tmp_path / "cat" / "catalog.json").read_text())
        assert meta["files"] == {"items": "items-000001.npz", "index": "index-000001.faiss",
                                 "model": "model.pt"}
        for name in ("catalog.json", "model.pt", *meta["files"].values()):
            assert (tmp_path / "cat" / name).is_file()

    # The same item photographed again: a catalogued image, slightly noisier.
    image = cv2.imread(str(data / "triangle" / "003.png")).astype(np.int16)
    noisy = np.clip(image + np.random.default_rng(0).integers(-6, 7, image.shape), 0, 255)
    cv2.imwrite(str(tmp_path / "query.png"), noisy.astype(np.uint8))
    result = invoke("search", place("cat"), tmp_path / "query.png", "--k", "3",
                    "--json", tmp_path / "r.json", "--workers", "0")
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert found["matches"][0]["path"].endswith("triangle/003.png")
    assert found["matches"][0]["class"] == "triangle"
    assert found["matches"][0]["similarity"] > 0.9
    assert found["predicted"] is not None and 0 < found["score"] <= 1
    assert len(found["matches"]) == 3


def test_threads_sharing_a_searcher_embed_one_batch_at_a_time(trained, tmp_path):
    """A service's search batches and its adds embed with one searcher's model; each embedding
    sets the model's device, layout and mode, and a forward pass that overlapped another
    thread's computed wrong vectors (1 call in ~300 under four threads), so the searcher lets
    one batch run at a time. The catalogue's model loads in eval mode: nothing switches it
    between train and eval under another thread."""
    import threading
    import time

    from ascension_cli.catalog.search import CatalogSearcher
    from ascension_cli.data.folder import decode_image

    root, data, checkpoint = trained
    result = invoke("index", checkpoint, data, "-o", tmp_path / "cat", "--workers", "0")
    assert result.exit_code == 0, result.output
    searcher = CatalogSearcher(load_catalog(tmp_path / "cat", with_vectors=False))
    assert not searcher.model.training
    features, running, overlaps = searcher.model.features, [0], []

    def features_watched(images):
        running[0] += 1
        overlaps.append(running[0])
        time.sleep(0.02)  # long enough for another thread to come in, were it let in
        try:
            return features(images)
        finally:
            running[0] -= 1

    searcher.model.features = features_watched
    image = decode_image((data / "triangle" / "003.png").read_bytes(), "q", min_side=64)
    found = []
    threads = [threading.Thread(target=lambda: found.append(
        searcher.embed_decoded([image], workers=0)[0])) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 4 and max(overlaps) == 1
    assert all(np.allclose(vectors, found[0], atol=1e-5) for vectors in found)


def test_search_a_folder_and_the_unknown_threshold(trained, place, tmp_path):
    root, data, checkpoint = trained
    assert invoke("index", checkpoint, data, "-o", place("cat"), *place.shared,
                  "--workers", "0").exit_code == 0
    queries = tmp_path / "queries"
    queries.mkdir()
    shutil.copy(data / "circle" / "001.png", queries / "known.png")
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cv2.imwrite(str(queries / "stranger.png"), noise)
    result = invoke("search", place("cat"), queries, "--threshold", "0.999",
                    "--json", tmp_path / "r.json", "--workers", "0")
    assert result.exit_code == 0, result.output
    by_name = {r["query"].rsplit("/", 1)[-1]: r
               for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert by_name["known.png"]["unknown"] is False
    assert by_name["known.png"]["matches"][0]["class"] == "circle"
    assert by_name["stranger.png"]["unknown"] is True
    assert by_name["stranger.png"]["predicted"] is None


def by_path(catalog) -> dict:
    """Each photo's vector and class, by its path (a Milvus catalogue reads in key order)."""
    return {path: (catalog.vectors[row].tobytes(), catalog.class_name(int(catalog.labels[row])))
            for row, path in enumerate(catalog.paths)}


def test_add_appends_without_re_embedding_the_old_items(trained, place, tmp_path):
    root, data, checkpoint = trained
    part = tmp_path / "part"
    for name in ("circle", "cross"):
        shutil.copytree(data / name, part / name)
    assert invoke("index", checkpoint, part, "-o", place("cat"), *place.shared,
                  "--workers", "0").exit_code == 0
    before = load_catalog(place("cat"))
    assert len(before) == 16 and before.class_names == ["circle", "cross"]

    shutil.copytree(data / "square", part / "square")
    result = invoke("index", checkpoint, part, "-o", place("cat"), "--add", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "(8 added)" in result.output
    after = load_catalog(place("cat"))
    assert len(after) == 24 and after.class_names == ["circle", "cross", "square"]
    old, new = by_path(before), by_path(after)
    assert {path: new[path] for path in old} == old  # the same vectors, not embedded again
    assert {new[path][1] for path in set(new) - set(old)} == {"square"}
    if place.folder:  # a folder's rows in the order they came
        assert after.paths[:16] == before.paths

    again = invoke("index", checkpoint, part, "-o", place("cat"), "--add", "--workers", "0")
    assert again.exit_code == 0 and "(0 added)" in again.output


def test_bad_input_ends_in_one_line(trained, place, tmp_path):
    root, data, checkpoint = trained
    assert invoke("index", checkpoint, data, "-o", place("cat"), *place.shared,
                  "--workers", "0").exit_code == 0
    cases = []
    other_root = tmp_path / "other"
    _, other_checkpoint = train_tiny(other_root, seed=1)
    cases.append((invoke("index", other_checkpoint, data, "-o", place("cat"), "--add"),
                  "built with another model"))
    cases.append((invoke("index", checkpoint, data, "-o", place("cat"), *place.shared),
                  "already holds a catalogue"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    cases.append((invoke("search", place("cat"), tmp_path / "broken.png", "--workers", "0"),
                  "broken.png"))
    if place.folder:
        cases.append((invoke("search", tmp_path / "nowhere", tmp_path / "broken.png"),
                      "CATALOG: folder not found"))
        cases.append((invoke("search", other_root, tmp_path / "broken.png"),
                      "not an Ascension catalogue"))
    else:
        cases.append((invoke("search", place("nowhere"), tmp_path / "broken.png"),
                      "holds no catalogue (no such collection)"))
    cases.append((invoke("search", place("cat"), tmp_path / "missing.png"),
                  "IMAGES: not found"))
    bad_gallery = tmp_path / "bad_gallery" / "x"
    bad_gallery.mkdir(parents=True)
    (bad_gallery / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    cases.append((invoke("index", checkpoint, bad_gallery.parent, "-o", place("empty"),
                         *place.shared, "--workers", "0"), "catalogue would be empty"))
    for result, message in cases:
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        # Skipped files may be reported above it; the error itself is the one last line.
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert lines[-1].startswith("error:") and message in lines[-1], result.output
        assert sum(line.startswith("error:") for line in lines) == 1


def test_a_manifest_s_item_ids_name_matches_and_group_by_item_counts_each_item_once(
        trained, place, tmp_path):
    from ascension_cli import api

    root, data, checkpoint = trained
    photos = sorted(data.rglob("*.png"))
    # Two photos per item (a product photographed twice), four classes.
    rows = [f"{p.relative_to(data.parent).as_posix()},{p.parent.name},"
            f"sku-{p.parent.name}-{int(p.stem) // 2}" for p in photos]
    (tmp_path / "m.csv").write_text("path,label,item_id\n" + "\n".join(rows) + "\n")
    shutil.copytree(data, tmp_path / data.name)
    catalog = api.index(checkpoint, tmp_path / "m.csv", place("cat"), workers=0,
                        **place.options).catalog
    assert catalog.items()[0].startswith("sku-") and len(set(catalog.items())) == 16
    kept = load_catalog(place("cat"))  # read back: each photo's item (in the store's order)
    assert sorted(zip(kept.paths, kept.items(), strict=True)) == sorted(
        zip(catalog.paths, catalog.items(), strict=True))

    query = data / "square" / "002.png"
    by_photo = api.search(place("cat"), query, k=6, workers=0)[0]
    by_item = api.search(place("cat"), query, k=6, workers=0, group_by="item")[0]
    assert all(m.item and m.item.startswith("sku-") for m in by_photo.matches)
    items = [m.item for m in by_item.matches]
    assert len(items) == len(set(items)) == 6  # each item once, by its best photo
    # The best photo of each item, in order: the photo ranking with repeats removed.
    deep = api.search(place("cat"), query, k=32, workers=0)[0].matches
    firsts = [m for i, m in enumerate(deep) if m.item not in {d.item for d in deep[:i]}]
    assert [(m.item, m.id) for m in by_item.matches] == [(m.item, m.id) for m in firsts[:6]]
    assert by_item.item == by_item.matches[0].item == by_photo.item
    assert by_item.to_dict()["matches"][0]["item"] == by_item.item

    result = invoke("search", place("cat"), query, "--group-by", "item", "--k", "3",
                    "--workers", "0", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "sku-" in result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["group_by"] == "item" and saved["results"][0]["item"] == by_item.item


def test_a_folder_catalogue_s_items_are_its_classes(trained, place, tmp_path):
    from ascension_cli import api

    _, data, checkpoint = trained
    catalog = api.index(checkpoint, data, place("cat"), workers=0, **place.options).catalog
    if place.folder:
        assert catalog.item_ids is None  # nothing stored: the default
    assert catalog.items() == [catalog.class_names[label] for label in catalog.labels]
    result = api.search(place("cat"), data / "circle" / "001.png", k=3, workers=0,
                        group_by="item")[0]
    assert len({m.item for m in result.matches}) == 3 <= len(catalog.class_names)
    assert all(m.item == m.class_name for m in result.matches)


def test_an_add_warns_of_new_items_confusable_with_another_class(trained, place, tmp_path):
    from ascension_cli import api

    root, data, checkpoint = trained
    api.index(checkpoint, data, place("cat"), workers=0, **place.options)
    # Copies of the circles filed as a new class: each the twin of a circle.
    shutil.copytree(data / "circle", tmp_path / "extra" / "disc")
    result = invoke("index", checkpoint, tmp_path / "extra", "-o", place("cat"), "--add",
                    "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "warning: 1 new item(s) as similar to an item of another class" in result.output
    assert "disc [disc] ~ circle [circle]: 1.000" in result.output
    added = api.index(checkpoint, data / "square", place("cat"), add=True, workers=0)
    assert added.added == 0 and added.onboarding == []  # nothing new, nothing to warn of


def unordered(check: dict) -> dict:
    """A check's report with each pair's two photos in path order (which comes first follows
    the rows' order, a folder's as added, a Milvus collection's by key) and its similarity to
    5 decimals (two searches over the same float32 vectors may sum in another order: a twin
    pair measured 1.0000001 once and 0.99999994 the next time)."""
    def pair(entry: dict) -> dict:
        first, second = sorted([entry["photo"], entry["other_photo"]], key=str)
        return {**entry, "photo": first, "other_photo": second,
                "similarity": round(entry["similarity"], 5)}

    return {**check, "cross_class_duplicates": [pair(e) for e in check["cross_class_duplicates"]],
            "confusable_items": [pair(e) for e in check["confusable_items"]]}


def test_check_lists_a_photo_filed_under_two_classes_and_a_mislabelled_one(trained, place,
                                                                           tmp_path):
    _, data, checkpoint = trained
    messy = tmp_path / "messy"
    shutil.copytree(data, messy)
    shutil.copy(messy / "circle" / "002.png", messy / "square" / "circle-copy.png")
    built = invoke("index", checkpoint, messy, "-o", place("cat"), *place.shared,
                   "--workers", "0", "--check", "--json", tmp_path / "check.json")
    assert built.exit_code == 0, built.output
    assert "near-duplicate photos filed under different classes: 1:" in built.output
    check = json.loads((tmp_path / "check.json").read_text())["check"]
    pair = check["cross_class_duplicates"][0]
    assert {pair["photo"]["class"], pair["other_photo"]["class"]} == {"circle", "square"}
    assert pair["similarity"] > 0.999
    assert check["threshold"] == 0.9 and check["calibrated"] is False
    # Item pairs as close as the threshold: the two classes holding the twin photos.
    assert ["circle", "square"] in [[p["item"], p["other_item"]]
                                    for p in check["confusable_items"]]

    # A catalogue checked as it is, without a checkpoint: the same lists.
    again = invoke("index", "--check", "-o", place("cat"), "--json", tmp_path / "2.json")
    assert again.exit_code == 0, again.output
    assert "added" not in again.output.splitlines()[0]
    assert unordered(json.loads((tmp_path / "2.json").read_text())["check"]) == unordered(check)
    nowhere = "folder not found" if place.folder else "holds no catalogue"
    for args, message in (((checkpoint, "-o", place("cat")), "give both CHECKPOINT and"),
                          (("-o", place("cat")), "--check checks one as it is"),
                          (("--check", "-o", place("none")), nowhere)):
        refused = invoke("index", *args)
        assert refused.exit_code == 2 and message in refused.output, refused.output
        assert "Traceback" not in refused.output


def test_check_finds_a_label_error_among_clusters(tmp_path):
    """On a catalogue whose vectors are known (not a model's): the photo filed under the wrong
    class is the one suspected, with the class its neighbours agree on."""
    from ascension_cli.catalog.check import check_catalog
    from ascension_cli.catalog.store import Catalog, write_catalog
    from ascension_cli.model.backbone import ModelSpec

    rng = np.random.default_rng(0)
    centres = np.eye(3, 8)
    labels = np.repeat(np.arange(3), 10)
    vectors = centres[labels] + rng.normal(scale=0.05, size=(30, 8))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    labels[4] = 2  # a photo of class 0 filed under class 2
    spec = ModelSpec("test_convnext", 8, "none", 32, (0.5,) * 3, (0.5,) * 3, 1.0, 8)
    catalog = write_catalog(Catalog(tmp_path / "cat", spec, "0" * 64, "backbone",
                                    ["a", "b", "c"], vectors, labels,
                                    [f"/x/{i}.png" for i in range(30)]), None)
    check = check_catalog(catalog)
    assert [(entry.row, entry.suggested) for entry in check.suspected] == [(4, 0)]
    assert check.to_dict()["suspected_label_errors"][0]["suggested_class"] == "a"


def test_vote_weighs_by_similarity():
    matches = [Match("a", "x", 0.9), Match("b", "y", 0.5), Match("c", "y", 0.5),
               Match("d", None, 0.99)]
    assert vote(matches) == ("y", pytest.approx(1.0 / 1.9))
    assert vote([Match("a", None, 0.9)]) == (None, 0.0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize(("features", "flip"),
                         [("backbone", False), ("head", False), ("backbone", True)])
def test_exports_match_pytorch(trained, tmp_path, features, flip):
    ort = pytest.importorskip("onnxruntime")
    root, data, checkpoint = trained
    if flip:  # the same weights, recorded as embedding each photo with its mirror image
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
        payload["spec"]["flip_average"] = True
        checkpoint = tmp_path / "flip.pt"
        torch.save(payload, checkpoint)
    onnx_file, script_file = tmp_path / "m.onnx", tmp_path / "m.pt"
    for fmt, path in (("onnx", onnx_file), ("torchscript", script_file)):
        result = invoke("export", checkpoint, "--format", fmt, "-o", path,
                        "--features", features)
        assert result.exit_code == 0, result.output
        assert "L2-normalised" in result.output
    model, _, _ = load_model(checkpoint)
    model.eval()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(script_file))
    for batch in (1, 3):  # the batch size is dynamic
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = (model.features(images) if features == "backbone" else model(images))
            from_script = scripted(images)
        from_onnx = session.run(None, {"images": images.numpy()})[0]
        assert from_onnx.shape == tuple(expected.shape)
        assert np.allclose(from_onnx, expected.numpy(), atol=1e-4)
        assert torch.allclose(from_script, expected, atol=1e-4)
        assert np.allclose(np.linalg.norm(from_onnx, axis=1), 1, atol=1e-4)
        mirrored = session.run(None, {"images": torch.flip(images, dims=(-1,)).numpy()})[0]
        assert np.allclose(mirrored, from_onnx, atol=1e-4) == flip


def test_export_bad_format_is_one_line(trained, tmp_path):
    root, data, checkpoint = trained
    result = invoke("export", checkpoint, "--format", "tflite", "-o", tmp_path / "m")
    assert result.exit_code == 2 and "invalid --format" in result.output
