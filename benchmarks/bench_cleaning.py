"""Finding label errors in real photos: flip a known share of the training photos' labels,
train on them, and count the flipped photos among the suspected label errors the report (and
``index --check``) lists, most suspect first (``retrieval/cleaning.py``).

Each set is split once per class (``bench_quality.split_set``); ``--flip`` of its train photos
are filed under another class, drawn at random (seeded). Ascension's defaults train on the
noisy train photos (validating on the clean val split), then embed them; the frozen pretrained
backbone, which never saw a label, is the baseline. For each, over the noisy train photos:

- precision and recall of the flipped photos among the first ``SHOWN`` entries (what the
  report draws), among the first as many as were flipped, and over the whole list.

    python benchmarks/bench_cleaning.py --quick   # a few minutes: 2 epochs, 150 photos a class
    python benchmarks/bench_cleaning.py           # 5 epochs, every photo (docs/benchmarks.md)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from _common import print_table, write_json
from bench_quality import (
    backbone_model,
    link_tree,
    settings_of,
    split_set,
    train_ascension,
    training_args,
    training_parser,
)


def found_flips(vectors: np.ndarray, labels: np.ndarray, flipped: np.ndarray) -> dict:
    """Precision and recall of ``flipped`` among the suspected label errors, at three depths."""
    from ascension_cli.retrieval.cleaning import NEIGHBOURS, suspected_label_errors
    from ascension_cli.retrieval.index import nearest_neighbours
    from ascension_cli.retrieval.report_sections import SHOWN

    ids, scores = nearest_neighbours(vectors, None, min(NEIGHBOURS, len(vectors) - 1))
    suspected = [entry.row for entry in suspected_label_errors(ids, scores, labels)]
    wrong = set(flipped.tolist())
    figures = {"suspected": len(suspected)}
    for name, depth in (("shown", SHOWN), ("flipped", len(wrong)), ("all", len(suspected))):
        top = suspected[:depth]
        hits = len(wrong.intersection(top))
        figures[name] = {"depth": len(top), "precision": hits / len(top) if top else float("nan"),
                         "recall": hits / len(wrong) if wrong else float("nan")}
    return figures


def run_set(root: Path, args) -> dict:
    from ascension_cli.embedding.pipeline import embed_images
    from ascension_cli.model.checkpoint import load_model

    split = split_set(root, args.split_seed, args.test_fraction, args.val_fraction,
                      args.max_per_class)
    paths, labels = split.part("train")
    rng = np.random.default_rng(args.seed)
    flipped = np.sort(rng.choice(len(labels), round(args.flip * len(labels)), replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, len(split.classes), len(flipped))) % len(
        split.classes)
    work = Path(tempfile.mkdtemp(prefix="bench-cleaning-"))
    try:
        checkpoint, seconds, _ = train_ascension(
            link_tree(work / "train", split, "train", labels=noisy),
            link_tree(work / "val", split, "val"), args, args.seed, work / "run")
        trained = load_model(checkpoint)[:2]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"photos": len(labels), "flipped": len(flipped), "train_seconds": seconds}
    for system, (model, spec) in (("frozen", backbone_model(args)), ("ascension", trained)):
        vectors, _, found = embed_images(model, spec, paths, noisy, feature_kind="backbone",
                                         batch_size=64, workers=0)
        kept = np.flatnonzero(np.isin(flipped, found))
        result[system] = found_flips(vectors, noisy[found], np.searchsorted(found,
                                                                             flipped[kept]))
    return result


def main() -> None:
    parser = training_parser(__doc__, __file__)
    parser.add_argument("--flip", type=float, default=0.02,
                        help="share of the train photos filed under another class")
    parser.add_argument("--seed", type=int, default=0, help="which labels flip; training seed")
    args, sets = training_args(parser)
    results, rows = {}, []
    for root in sets:
        result = results[root.name] = run_set(root, args)
        for system in ("frozen", "ascension"):
            figures = result[system]
            rows.append([root.name, system, f"{result['flipped']} of {result['photos']}",
                         str(figures["suspected"])] + [
                f"{figures[d]['precision']:.3f} / {figures[d]['recall']:.3f}"
                for d in ("shown", "flipped", "all")])
    print_table(f"flipped labels found ({args.flip:.0%} of the train photos, {args.epochs} "
                "epochs): precision / recall", ["set", "vectors", "flipped", "suspected",
                                                "first shown", "first #flipped", "whole list"],
                rows)
    write_json("bench_cleaning", {
        "settings": settings_of(args, sets),
        "results": results,
    }, args.json)


if __name__ == "__main__":
    main()
