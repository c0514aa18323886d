"""The HTML retrieval report: its figures against loops, its content, and how a browser shows it."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from ascension_cli import train_supcon
from ascension_cli.cli.app import app
from ascension_cli.embedding.vectors import Vectors
from ascension_cli.retrieval import html_report
from ascension_cli.retrieval.analysis import confused_pairs, first_correct_rank, worst_queries
from ascension_cli.retrieval.evaluate import evaluate_vectors
from tests.conftest import chromium, make_dataset

runner = CliRunner()


def test_confusions_and_ranks_match_a_loop():
    rng = np.random.default_rng(0)
    gallery_labels = rng.integers(0, 5, 40)
    query_labels = rng.integers(0, 5, 30)
    ids = np.stack([rng.permutation(40)[:6] for _ in range(30)])
    ids[3, 2:] = -1  # fewer neighbours than the depth
    query_labels[7] = -2  # a class the gallery lacks

    expected = Counter()
    for row in range(30):
        top = gallery_labels[ids[row, 0]]
        if query_labels[row] >= 0 and top != query_labels[row]:
            expected[(int(query_labels[row]), int(top))] += 1
    pairs = confused_pairs(ids, query_labels, gallery_labels, most=100)
    assert {(p.query_class, p.neighbour_class): p.count for p in pairs} == dict(expected)
    assert [p.count for p in pairs] == sorted((p.count for p in pairs), reverse=True)
    for pair in pairs:
        for row, neighbour in pair.examples:
            assert query_labels[row] == pair.query_class and neighbour == ids[row, 0]

    ranks = first_correct_rank(ids, query_labels, gallery_labels)
    for row in range(30):
        found = [r + 1 for r, i in enumerate(ids[row])
                 if i >= 0 and gallery_labels[i] == query_labels[row]]
        assert ranks[row] == (found[0] if found else 7)
    worst = worst_queries(ids, query_labels, gallery_labels, count=5)
    assert [rank for _, rank in worst] == sorted((rank for _, rank in worst), reverse=True)
    assert all(query_labels[row] >= 0 and rank > 1 for row, rank in worst)


def vectors_of(data: Path, count: int, classes: int, seed: int = 0) -> Vectors:
    """Labelled vectors whose paths cycle over the images under ``data``."""
    images = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    centres = rng.normal(size=(classes, 16))
    vectors = centres[labels] + rng.normal(scale=0.8, size=(count, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return Vectors(vectors.astype(np.float32), labels, [images[i % len(images)]
                   for i in range(count)], [f"class{c}" for c in range(classes)],
                   image_root=str(data))


def test_a_large_set_is_sampled_for_the_map_and_the_page_says_so(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(html_report, "MAP_POINTS", 50)
    run = evaluate_vectors(vectors_of(dataset, 400, 8), ks=(1, 5))
    info = html_report.write_report(run, tmp_path / "r.html", "a report")
    page = info.path.read_text()
    assert (info.drawn_points, info.total_points) == (50, 400)
    assert "50 of 400 vectors, sampled at random" in page
    assert page.count("<circle") == 50
    for section in ("metrics", "classes", "confused", "worst", "openset", "cleaning", "map"):
        assert f"<h2 id={section}>" in page
    assert "http://" not in page and "https://" not in page  # opens offline


def test_the_report_draws_the_open_set_and_lists_the_photos_to_clean(dataset, tmp_path):
    from ascension_cli.api.evaluation import open_set_of
    from ascension_cli.retrieval.cleaning import suspected_label_errors
    from ascension_cli.retrieval.index import nearest_neighbours

    vectors = vectors_of(dataset, 200, 4, seed=1)
    vectors.labels[[3, 50, 120]] = (vectors.labels[[3, 50, 120]] + 1) % 4  # mislabelled
    vectors.vectors[7] = vectors.vectors[8]  # one photo twice...
    vectors.labels[7] = (vectors.labels[8] + 2) % 4  # ...under two classes
    run = evaluate_vectors(vectors, ks=(1, 5))
    open_set = open_set_of(run, 0.25, 0.05)
    page = html_report.write_report(run, tmp_path / "r.html", "a report",
                                    open_set=open_set).path.read_text()
    assert f"<td>threshold for FMR 5.0%</td><td>{open_set.threshold:.4f}</td>" in page
    assert "<td>ROC AUC, known against unknown</td>" in page
    assert "id=similarities" in page and "id=rates" in page
    assert f"unknown ({open_set.unknown_queries})" in page  # the legend counts each kind
    ids, scores = nearest_neighbours(vectors.vectors, None, 32)
    suspected = suspected_label_errors(ids, scores, vectors.labels)
    found = {entry.row for entry in suspected}
    assert len(found & {3, 50, 120}) >= 2 and found <= {3, 50, 120, 7}  # 7: the twin, filed wrong
    assert f"Suspected label errors: {len(suspected)} of 200 photos" in page
    for entry in suspected:  # each is drawn, with the class it is filed under
        assert f"{vectors.paths[entry.row]}: filed under <b>class{entry.label}</b>" in page
    assert "Near-duplicates filed under two classes: 1</h3>" in page

    closed = html_report.write_report(run, tmp_path / "c.html", "a report").path.read_text()
    assert "Pass --unknown-classes 0.2" in closed and "id=similarities" in closed
    assert "id=rates" not in closed


def train_tiny(root: Path) -> tuple[Path, Path]:
    data = make_dataset(root / "data", classes=5, per_class=12, size=40)
    train_supcon(data, batch_size=8, target_batch=16, epochs=2, lr=1e-3, save_dir=root / "run",
                 model="test_convnext", pretrained=False, image_size=32, samples_per_class=4,
                 workers=0, val_fraction=0.25)
    return data, root / "run"


def test_report_command_writes_a_page_a_browser_shows(tmp_path):
    data, run_dir = train_tiny(tmp_path)
    result = runner.invoke(app, ["report", str(run_dir), str(data), "-o",
                                 str(tmp_path / "report.html"), "--workers", "0",
                                 "--unknown-classes", "0.4"])
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    page = (tmp_path / "report.html").read_text()
    assert "Training run" in page and "validation Recall@1" in page and "target_batch" in page
    assert "validation Recall@5" in page and "validation MAP@R" in page
    assert page.count("data:image/jpeg;base64,") >= 10

    browser = chromium()
    base = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    url = (tmp_path / "report.html").as_uri()
    shown = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True,
                           timeout=120)
    body = re.search(r"<body[^>]*>", shown.stdout).group(0)
    assert 'data-ready="yes"' in body
    assert int(re.search(r'data-images="(\d+)"', body).group(1)) >= 10  # thumbnails decoded
    assert int(re.search(r'data-pairs-height="(\d+)"', body).group(1)) > 50  # pairs shown
    assert '<pre id="errors"></pre>' in shown.stdout
    assert 'id="similarities"' in shown.stdout and 'id="rates"' in shown.stdout  # open set
    assert "CONSOLE" not in shown.stderr, shown.stderr  # no console message, error or other
    screenshot = tmp_path / "report.png"
    subprocess.run(base + ["--window-size=1200,1800", f"--screenshot={screenshot}", url],
                   capture_output=True, timeout=120, check=True)
    assert screenshot.stat().st_size > 20_000
