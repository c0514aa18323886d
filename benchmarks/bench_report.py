"""The HTML report's cost on a large set, against the evaluation it reports (same run).

Synthetic unit vectors in many classes, whose paths cycle over a few hundred small generated
images (the report reads only what it draws). The baseline is ``evaluate_vectors`` on the same
set, which `ascension report` and `ascension eval` both run first; the report's own work is
``write_report``. Prints a table and writes JSON.

    python benchmarks/bench_report.py            # 100k vectors, 1000 classes, 128-d
    python benchmarks/bench_report.py --quick    # 20k vectors, 200 classes
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from _common import benchmark_parser, print_table, write_json


def make_images(root: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for index in range(count):
        image = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        name = f"img{index:04d}.jpg"
        cv2.imwrite(str(root / name), image)
        names.append(name)
    return names


def make_vectors(root: Path, count: int, classes: int, dim: int, images: list[str]):
    from ascension_cli.embedding.vectors import Vectors

    rng = np.random.default_rng(1)
    labels = rng.integers(0, classes, count)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    vectors = centres[labels] + 1.5 * rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return Vectors(vectors, labels, [images[i % len(images)] for i in range(count)],
                   [f"class{c}" for c in range(classes)], image_root=str(root))


def main() -> None:
    parser = benchmark_parser(__doc__, __file__)
    parser.add_argument("--vectors", type=int, help="how many vectors (default 100000)")
    args = parser.parse_args()
    count = args.vectors or (20_000 if args.quick else 100_000)
    classes, dim = (200 if args.quick else 1000), 128

    from ascension_cli.retrieval.evaluate import evaluate_vectors
    from ascension_cli.retrieval.html_report import write_report

    with tempfile.TemporaryDirectory(prefix="bench-report-") as folder:
        root = Path(folder)
        vectors = make_vectors(root, count, classes, dim, make_images(root, 500))
        started = time.perf_counter()
        run = evaluate_vectors(vectors, ks=(1, 5, 10))
        evaluation = time.perf_counter() - started
        info = write_report(run, root / "report.html", "benchmark")
        size = info.path.stat().st_size
    rows = [["evaluate_vectors (baseline)", f"{evaluation:.2f}", "1.00", "-"],
            ["write_report", f"{info.seconds:.2f}", f"{info.seconds / evaluation:.3f}",
             f"{size / 1e6:.1f} MB, map {info.drawn_points} of {info.total_points}"]]
    print_table(f"report on {count} vectors, {classes} classes, {dim}-d",
                ["step", "seconds", "ratio", "page"], rows)
    write_json("bench_report", {
        "vectors": count, "classes": classes, "dim": dim,
        "evaluate_seconds": evaluation, "report_seconds": info.seconds,
        "report_to_evaluate": info.seconds / evaluation, "page_bytes": size,
        "map_points": info.drawn_points,
    }, args.json)


if __name__ == "__main__":
    main()
