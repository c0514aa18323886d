"""The benchmarks still run (tiny sizes) and their baselines agree with our results."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_eval_runs_and_all_methods_find_the_same_neighbours(tmp_path):
    output = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_eval.py"), "--gallery", "600",
         "--queries", "60", "--dim", "16", "--classes", "10", "--json", str(output)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    data = json.loads(output.read_text())
    assert data["same_neighbours"] is True
    assert [r["method"] for r in data["results"]] == ["ascension", "numpy", "sklearn"]
    recalls = {r["recall_at_1"] for r in data["results"]}
    assert len(recalls) == 1


def run_benchmark(name: str, *arguments, timeout: int = 300) -> dict:
    output = Path(arguments[-1])
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *map(str, arguments)],
                   check=True, capture_output=True, text=True, timeout=timeout)
    return json.loads(output.read_text())


def test_bench_loss_runs_and_every_method_gives_our_loss(tmp_path):
    data = run_benchmark("bench_loss", "--views", "32", "64", "--dim", "16",
                         "--json", tmp_path / "loss.json")
    rows = [r for r in data["results"] if "method" in r]
    assert {r["views"] for r in rows} == {32, 64}
    assert {r["method"] for r in rows} >= {"ascension", "paper formula"}
    assert all(r["equal_to_ours"] for r in rows)
    assert all(r["seconds"] > 0 for r in rows)


def test_bench_step_runs_every_configuration(tmp_path):
    data = run_benchmark("bench_step", "--quick", "--image-size", "32", "--repeats", "1",
                         "--json", tmp_path / "step.json")
    # No compile row unless asked; the fp32 row wherever (a) ran in another precision.
    fp32_row = {"cache 16x8, fp32"} if data["precision"] != "fp32" else set()
    assert set(data["results"]) == {"cache 16x8", "naive 16x8", "true batch 128", "plain 16",
                                    "plain 16, two passes", "cache 16x8, NCHW", *fp32_row}
    if fp32_row:
        assert data["results"]["cache 16x8, fp32"]["precision"] == "fp32"
        assert data["precision_speedup_vs_fp32"] > 0
    else:
        assert data["precision_speedup_vs_fp32"] is None
    assert data["one_micro_batch_speedup"] > 0
    assert all(r["seconds"] > 0 for r in data["results"].values())
    assert data["cache_time_vs_naive"] > 0 and data["compile_speedup"] is None


def test_bench_data_and_bench_embed_run_on_a_folder(dataset, tmp_path):
    data = run_benchmark("bench_data", "--quick", "--root", dataset, "--size", "32",
                         "--json", tmp_path / "data.json")
    assert data["images"] == 32 and data["ours_vs_torchvision"] > 0
    assert data["cache"]["speedup"] > 0 and data["large_jpegs"] == {}
    embed = run_benchmark("bench_embed", "--quick", "--root", dataset, "--model",
                          "test_efficientnet", "--rounds", "1", "--json", tmp_path / "embed.json")
    assert embed["images"] == 32 and embed["ours_vs_hand_written"] > 0
    # Same images, same model: our pipeline and the hand-written loop agree.
    assert embed["mean_cosine_between_outputs"] > 0.95


def test_bench_quality_runs_every_system_on_a_tiny_set(tmp_path):
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "shapes", classes=3, per_class=10)
    result = run_benchmark(
        "bench_quality", "--sets", data, "--model", "test_efficientnet", "--weights", "none",
        "--image-size", "32", "--epochs", "1", "--variant", "linear:head=linear,lr=1e-3",
        "--json", tmp_path / "quality.json", timeout=600,
    )
    by_system = result["results"]["shapes"]
    systems = ["frozen", "plain", "proxyanchor", "multisim", "ascension", "linear"]
    assert list(by_system) == [f"{s}{budget}" for s in systems for budget in ("", " @passes")]
    for system, summary in by_system.items():
        figures = summary["mean"]
        assert 0 <= figures["recall_at_1"] <= figures["recall_at_5"] <= 1, system
        assert {"map_at_r", "recall_at_1_hue90", "recall_at_1_grayscale"} <= set(figures)
        assert (figures["train_seconds"] > 0) == (not system.startswith("frozen"))
    # Equal image passes: plain sees two views of a photo an epoch, the others one.
    epochs = {system: summary["mean"]["epochs"] for system, summary in by_system.items()}
    assert epochs == {s: 2 if s.endswith("@passes") and s.split()[0] not in (
        "frozen", "plain") else 1 for s in by_system}
    assert by_system["plain @passes"] == by_system["plain"]  # the same run, not trained twice
    assert result["variants"] == {"linear": {"head": "linear", "lr": 0.001}}
    assert isinstance(result["defaults_win_everywhere"], bool)
    # Paired on the same queries: the defaults against every baseline at the same budget, the
    # variant against the defaults too; each difference the mean of its per-query differences.
    paired = result["paired"]["shapes"]
    assert set(paired["ascension"]) == {"frozen", "plain", "proxyanchor", "multisim"}
    assert set(paired["linear @passes"]) == {
        f"{s} @passes" for s in ("frozen", "plain", "proxyanchor", "multisim", "ascension")}
    ours, theirs = by_system["ascension"]["runs"][0], by_system["plain"]["runs"][0]
    figures = paired["ascension"]["plain"]["map_at_r"]
    assert figures["mean"] == pytest.approx(
        np.mean(ours["per_query"]["map_at_r"]) - np.mean(theirs["per_query"]["map_at_r"]))
    assert figures["low"] <= figures["mean"] <= figures["high"]
    assert isinstance(result["defaults_win_beyond_noise"], bool) and result["complete"]
    # Below the starting model: each figure the defaults lose to the frozen features, and no other.
    below = result["below_starting_model"]["shapes"]
    for row, start in (("ascension", "frozen"), ("ascension @passes", "frozen @passes")):
        losses = {f for f, d in paired[row][start].items() if d["mean"] < 0}
        assert set(below.get(row, {})) == losses, row


def test_bench_quality_without_ascension_has_nothing_to_pair(tmp_path):
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "shapes", classes=3, per_class=6)
    result = run_benchmark(
        "bench_quality", "--sets", data, "--model", "test_efficientnet", "--weights", "none",
        "--image-size", "32", "--systems", "frozen", "--json", tmp_path / "q.json",
        timeout=300)
    assert result["complete"] and result["paired"] == {"shapes": {}}
    assert result["defaults_win_beyond_noise"] is None


def test_bench_quality_mixes_best_pt_with_the_starting_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "shapes", classes=3, per_class=8)
    weights = tmp_path / "start.safetensors"  # a 'pretrained' trunk for the run to start from
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), str(weights))
    result = run_benchmark(
        "bench_quality", "--sets", data, "--model", "test_efficientnet", "--weights", weights,
        "--image-size", "32", "--epochs", "2", "--systems", "frozen", "ascension",
        "--budget", "epochs", "--mix-start", "0", "0.5", "1", "--json", tmp_path / "q.json",
        timeout=300)
    by_system = result["results"]["shapes"]
    assert list(by_system) == ["frozen", "ascension", "ascension~0", "ascension~0.5",
                               "ascension~1"]

    def per_query(system: str) -> dict:
        return by_system[system]["runs"][0]["per_query"]

    # Share 1 is best.pt as trained; share 0 is the starting trunk, which the frozen row scores.
    assert per_query("ascension~1") == per_query("ascension")
    assert np.allclose(per_query("ascension~0")["map_at_r"], per_query("frozen")["map_at_r"],
                       atol=1e-5)
    assert by_system["ascension~0.5"]["mean"]["train_seconds"] == \
        by_system["ascension"]["mean"]["train_seconds"]  # one training, scored three ways
    paired = result["paired"]["shapes"]
    assert set(paired["ascension~0.5"]) == {"frozen", "ascension"}
    assert set(paired["ascension"]) == {"frozen"}


def test_a_mix_is_the_share_of_the_trained_trunk_and_the_rest_of_the_start(monkeypatch):
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_quality

    trained = torch.nn.ModuleDict({"backbone": torch.nn.BatchNorm1d(3),
                                   "head": torch.nn.Linear(3, 2)})
    start = torch.nn.ModuleDict({"backbone": torch.nn.BatchNorm1d(3)})
    with torch.no_grad():
        trained.backbone.weight.fill_(4.0)
        trained.backbone.num_batches_tracked.fill_(7)
        start.backbone.weight.fill_(2.0)
    head = trained.head.weight.detach().clone()
    monkeypatch.setattr(bench_quality, "backbone_model", lambda args: (start, None))
    monkeypatch.setattr(bench_quality, "score", lambda model, *rest: {
        "weight": model.backbone.weight.tolist(), "head": model.head.weight.clone(),
        "tracked": int(model.backbone.num_batches_tracked)})
    args = type("Args", (), {"mix_start": [0.0, 0.25, 1.0], "on": "test"})()
    mixes = bench_quality.score_mixes(trained, None, "backbone", None, args)
    assert [mixes[share]["weight"] for share in ("0", "0.25", "1")] == [
        [2.0] * 3, [2.5] * 3, [4.0] * 3]
    assert all(torch.equal(m["head"], head) and m["tracked"] == 7 for m in mixes.values())


def test_bench_quality_refuses_a_mix_without_starting_weights(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--sets", str(tmp_path),
         "--weights", "none", "--mix-start", "0.5"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--mix-start needs --weights" in done.stderr


def test_paired_difference_is_the_mean_difference_with_an_interval_that_covers_it():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _stats import FIGURES, below_start, beyond_noise, compare, paired_difference

    rng = np.random.default_rng(0)
    theirs = rng.random(400) < 0.7
    ours = [theirs | (rng.random(400) < 0.1), theirs | (rng.random(400) < 0.2)]
    mean, low, high = paired_difference(ours, [theirs])
    assert mean == pytest.approx((ours[0].mean() + ours[1].mean()) / 2 - theirs.mean())
    assert 0 < low < mean < high  # every query gained or stayed: the interval is above zero
    assert paired_difference([theirs], [theirs]) == (0.0, 0.0, 0.0)
    coin = [rng.random(400) < 0.5 for _ in range(2)]
    _, low, high = paired_difference([coin[0]], [coin[1]])
    assert low < 0 < high  # two coins: no lead beyond the luck of the queries
    with pytest.raises(ValueError, match="same"):
        paired_difference([theirs], [theirs[:-1]])

    def system(*runs):
        return {"runs": [{"per_query": {f: run for f in ("recall_at_1", "recall_at_5",
                                                         "map_at_r")}} for run in runs]}

    by_system = {"frozen": system(ours[0] | ours[1]), "ascension": system(*ours),
                 "plain": system(theirs), "lr3": system(coin[1])}
    paired = compare(by_system, {"lr3"})
    assert set(paired) == {"ascension", "lr3"} and set(paired["ascension"]) == {"frozen",
                                                                                "plain"}
    assert set(paired["lr3"]) == {"frozen", "plain", "ascension"}
    assert not beyond_noise(paired)  # the frozen features find every query ours find
    below = below_start(paired)  # ... and more: the defaults are below the starting model
    assert set(below) == {"ascension"} and set(below["ascension"]) == set(FIGURES)
    assert all(d["beyond_luck"] and d["mean"] < 0 for d in below["ascension"].values())
    assert below_start(compare({"ascension": system(*ours), "frozen": system(theirs)})) == {}
    assert beyond_noise(compare({"ascension": system(*ours), "plain": system(theirs)}))


def test_bench_openset_calibrates_on_val_and_measures_on_test(tmp_path):
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "shapes", classes=5, per_class=20)
    result = run_benchmark(
        "bench_openset", "--sets", data, "--model", "test_efficientnet", "--weights", "none",
        "--image-size", "32", "--epochs", "1", "--unknown-classes", "0.4", "--target-fmr",
        "0.1", "--draws", "2", "--json", tmp_path / "openset.json", timeout=600)
    shapes = result["results"]["shapes"]
    draws = shapes["draws"]
    assert [d["seed"] for d in draws] == [0, 1] and all(len(d["unknown_classes"]) == 2
                                                        for d in draws)
    for draw in draws:
        assert list(draw["thresholds"]) == ["calibrated on val", "oracle (chosen on test)",
                                            "fixed 0.5", "fixed 0.8"]
        oracle = draw["thresholds"]["oracle (chosen on test)"]
        assert (oracle["unknown"], oracle["known"]) == (8, 12) and draw["val_unknown"] == 8
        assert oracle["unknown_accepted"] <= 0.1 * 8  # met on test, by construction
    for name, at in shapes["pooled"].items():  # the draws' counts, summed
        assert at["unknown"] == 16 and at["known"] == 24, name
        assert at["unknown_accepted"] == sum(d["thresholds"][name]["unknown_accepted"]
                                             for d in draws)
        assert at["fmr"] == at["unknown_accepted"] / 16
    assert isinstance(result["calibrated_fmr_within_half_to_twice_target"], bool)


def test_bench_cleaning_counts_the_flipped_labels_it_finds(tmp_path):
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "shapes", classes=3, per_class=20)
    result = run_benchmark(
        "bench_cleaning", "--sets", data, "--model", "test_efficientnet", "--weights", "none",
        "--image-size", "32", "--epochs", "1", "--flip", "0.1", "--json",
        tmp_path / "cleaning.json", timeout=600)
    shapes = result["results"]["shapes"]
    assert shapes["photos"] == 36 and shapes["flipped"] == 4
    for system in ("frozen", "ascension"):
        figures = shapes[system]
        assert figures["all"]["depth"] == figures["suspected"]
        assert figures["flipped"]["depth"] == min(4, figures["suspected"])
        for depth in ("shown", "flipped", "all"):
            recall = figures[depth]["recall"]
            assert 0 <= recall <= 1


def test_bench_report_measures_the_report_against_the_evaluation(tmp_path):
    result = run_benchmark("bench_report", "--quick", "--vectors", "3000",
                           "--json", tmp_path / "report.json")
    assert result["vectors"] == 3000 and result["map_points"] == 1500
    assert result["report_seconds"] > 0 and result["evaluate_seconds"] > 0
    assert result["report_to_evaluate"] == pytest.approx(
        result["report_seconds"] / result["evaluate_seconds"])


def test_bench_serve_compares_the_service_with_one_request_one_forward(tmp_path):
    pytest.importorskip("fastapi")
    result = run_benchmark("bench_serve", "--quick", "--seconds", "5",
                           "--json", tmp_path / "serve.json", timeout=600)
    assert set(result["results"]) == {"serve/1", "serve/8", "plain/1", "plain/8", "search/1"}
    for figures in result["results"].values():
        assert figures["requests"] > 0
        assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
    assert result["throughput_ratio"] == pytest.approx(
        result["results"]["serve/8"]["requests_per_second"]
        / result["results"]["plain/8"]["requests_per_second"])


def test_bench_scale_measures_every_kind_against_flat_and_projects(tmp_path):
    result = run_benchmark("bench_scale", "--sizes", "3000", "12000", "--dim", "32",
                           "--queries", "20", "--recall-sample", "50",
                           "--json", tmp_path / "scale.json")
    rows = result["results"]
    assert {(r["count"], r["kind"]) for r in rows} == {
        (n, k) for n in (3000, 12000) for k in ("flat", "ivfpq", "ivf", "hnsw")}
    for row in rows:
        assert 0.7 * row["stored_bytes"] <= row["estimated_bytes"] <= 1.5 * row["stored_bytes"]
        assert 0 < row["recall_at_10_vs_exact"] <= 1 and row["latency_ms_median"] > 0
    assert set(result["projected"]) == {"flat", "ivfpq", "ivf", "hnsw"}
    again = run_benchmark("bench_scale", "--rows-from", tmp_path / "scale.json",
                          "--json", tmp_path / "again.json")
    assert again["projected"] == result["projected"]


def test_bench_scale_compares_a_folder_and_a_milvus_catalogue(milvus_server, tmp_path):
    result = run_benchmark("bench_scale", "--store", "milvus", "--sizes", "2000", "--dim", "32",
                           "--queries", "10", "--milvus", milvus_server.address,
                           "--json", tmp_path / "stores.json")
    rows = {row["store"]: row for row in result["results"]}
    assert set(rows) == {"folder", "milvus"} and result["size"] == 2000
    for row in rows.values():
        assert row["count"] == 2000 and row["build_seconds"] > 0
        assert 0 < row["latency_ms_median"] <= row["latency_ms_p95"]
        assert row["qps_1"] > 0 and row["qps_16"] > 0 and row["service_mib"] > 0


def test_bench_shards_compares_shards_with_the_folder(dataset, tmp_path):
    result = run_benchmark("bench_shards", "--quick", "--root", dataset, "--size", "32",
                           "--workers", "0", "--json", tmp_path / "shards.json")
    assert result["images"] == 32 and result["shards"] >= 1
    assert result["shards_vs_folder"] == pytest.approx(
        result["shard_images_per_second"] / result["folder_images_per_second"])


def git(root: Path, *args: str) -> None:
    """``git`` in ``root``, as a test's own committer."""
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True)


def fake_repository(root: Path, files: dict[str, bytes]) -> Path:
    """A git repository holding ``files`` (path -> content), as a get_*.py script clones it."""
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "photos")
    return root


def test_get_trashnet_builds_a_class_tree_or_nothing(tmp_path):
    classes = ("cardboard", "glass", "metal", "paper", "plastic", "trash")
    photos = {f"dataset-resized/{c}/{c}{i}.jpg": f"{c}{i}".encode() for c in classes
              for i in (1, 2)}
    source = fake_repository(tmp_path / "repo", {**photos, "README.md": b"notebooks"})
    script = [sys.executable, str(ROOT / "benchmarks" / "get_trashnet.py"), "--source", source]
    built = subprocess.run([*script, "--output", tmp_path / "trash"], capture_output=True,
                           text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    assert "12 photos in 6 classes" in built.stdout
    tree = tmp_path / "trash"
    assert sorted(p.name for p in tree.iterdir() if p.is_dir()) == list(classes)
    assert (tree / "glass" / "glass2.jpg").read_bytes() == b"glass2"
    assert "MIT" in (tree / "SOURCE.txt").read_text()
    # A copy without one of the classes: one line, exit 1, and no half-made tree left.
    git(source, "rm", "-rqf", "dataset-resized/trash")
    git(source, "commit", "-qm", "less")
    failed = subprocess.run([*script, "--output", tmp_path / "half"], capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode == 1 and "no photos of 'trash'" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trashnet")]


def test_get_trashnet_refuses_a_link_where_a_photo_should_be(tmp_path):
    """A hostile copy of the set: a "photo" that links to a device would hang the copy."""
    classes = ("cardboard", "glass", "metal", "paper", "plastic", "trash")
    source = fake_repository(tmp_path / "repo", {f"dataset-resized/{c}/{c}1.jpg": b"x"
                                                 for c in classes})
    (source / "dataset-resized" / "glass" / "glass2.jpg").symlink_to("/dev/zero")
    git(source, "add", "-A")
    git(source, "commit", "-qm", "a link")
    failed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "get_trashnet.py"),
                             "--source", source, "--output", tmp_path / "trash"],
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1, failed.stderr
    assert "glass2.jpg is not a photo file" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "trash").exists()
    # An --output that cannot be made (its parent is a file): one line, no traceback.
    (tmp_path / "a-file").write_text("not a folder")
    failed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "get_trashnet.py"),
                             "--source", source, "--output", tmp_path / "a-file" / "trash"],
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "cannot build" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr and len(failed.stderr.splitlines()) == 1


def card_repository(root: Path, extra: dict[str, bytes]) -> Path:
    """A copy of the playing-cards set: one photo of each of its 53 classes in ``train`` and a
    second in ``test`` (distinct bytes), plus ``extra``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from get_cards import CLASSES
    photos = {f"dataset/{split}/{name}/{split}1.jpg": f"{split} {name}".encode()
              for name in CLASSES for split in ("train", "test")}
    return fake_repository(root, {**photos, "dataset/cards.csv": b"index", **extra})


def test_get_cards_pools_the_splits_and_drops_repeated_bytes(tmp_path):
    # The same bytes under two classes (a label error: both go), and twice in one class (kept
    # once).
    source = card_repository(tmp_path / "repo", {
        "dataset/train/four of clubs/127.jpg": b"one card, two labels",
        "dataset/train/four of spades/120.jpg": b"one card, two labels",
        "dataset/valid/joker/2.jpg": b"train joker"})
    built = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "get_cards.py"),
                            "--source", source, "--output", tmp_path / "cards"],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    assert "106 photos in 53 classes (2-2 a class)" in built.stdout
    tree = tmp_path / "cards"
    assert len([p for p in tree.iterdir() if p.is_dir()]) == 53
    assert sorted(p.name for p in (tree / "four-of-clubs").iterdir()) == ["test-test1.jpg",
                                                                          "train-train1.jpg"]
    assert (tree / "joker" / "test-test1.jpg").read_bytes() == b"test joker"
    assert not (tree / "joker" / "valid-2.jpg").exists()
    assert "CC0" in (tree / "SOURCE.txt").read_text()
    assert "Left out: 3 photos" in (tree / "SOURCE.txt").read_text()


def test_get_cards_refuses_a_link_and_a_missing_class(tmp_path):
    source = card_repository(tmp_path / "repo", {})
    (source / "dataset" / "valid" / "joker").mkdir(parents=True)
    (source / "dataset" / "valid" / "joker" / "2.jpg").symlink_to("/etc/passwd")
    git(source, "add", "-A")
    git(source, "commit", "-qm", "a link")
    script = [sys.executable, str(ROOT / "benchmarks" / "get_cards.py"), "--source", source]
    failed = subprocess.run([*script, "--output", tmp_path / "cards"], capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode == 1 and "2.jpg is not a photo file" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "cards").exists()
    git(source, "rm", "-rqf", "dataset/valid/joker", "dataset/train/joker", "dataset/test/joker")
    git(source, "commit", "-qm", "no joker")
    failed = subprocess.run([*script, "--output", tmp_path / "cards"], capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode == 1 and "no photos of 'joker'" in failed.stderr, failed.stderr
    assert not (tmp_path / "cards").exists()


def test_a_variant_with_its_own_epochs_trains_them_at_both_budgets():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_quality

    assert bench_quality.epochs_at("epochs", "cheap", {"epochs": 7}, 5) == 7
    assert bench_quality.epochs_at("passes", "cheap", {"epochs": 7}, 5) == 14
    assert bench_quality.epochs_at("passes", "cheap", {"epochs": 7, "views": 2}, 5) == 7
    assert bench_quality.epochs_at("epochs", "ascension", None, 5) == 5


def test_bench_quality_trains_a_variant_for_its_own_epochs(tmp_path):
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "shapes", classes=3, per_class=6)
    result = run_benchmark(
        "bench_quality", "--sets", data, "--model", "test_efficientnet", "--weights", "none",
        "--image-size", "32", "--epochs", "1", "--systems", "--budget", "epochs",
        "--variant", "longer:epochs=2", "--json", tmp_path / "q.json", timeout=300)
    run = result["results"]["shapes"]["longer"]["runs"][0]
    assert run["epochs"] == 2 and len(run["val_recall_at_1_by_epoch"]) == 3  # the start, 1, 2


def test_quick_reads_only_the_shared_sets_so_it_keeps_its_size_as_the_cache_grows(
        tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _sets
    import bench_quality

    shared, cache = tmp_path / "shared", tmp_path / "cache"
    for folder in (shared / "b", shared / "a", cache / "c", cache / ".c-partial"):
        folder.mkdir(parents=True)
    monkeypatch.setattr(_sets, "SHARED_DATA", shared)
    monkeypatch.setattr(_sets, "CACHE", cache)
    assert [p.name for p in _sets.suite()] == ["a", "b", "c"]
    assert [p.name for p in _sets.suite(cached=False)] == ["a", "b"]
    for argv, names, epochs in ((["--quick"], ["a", "b"], 2), ([], ["a", "b", "c"], 5)):
        monkeypatch.setattr(sys, "argv", ["bench_quality.py", *argv])
        args, sets = bench_quality.training_args(
            bench_quality.training_parser("doc", "bench_quality.py"))
        assert ([p.name for p in sets], args.epochs) == (names, epochs)
