"""Open-set recognition on real photos: does a catalogue calibrated for a false match rate
accept that share of photos of items it lacks, on photos no choice was made on?

Each set is split once per class into train / val / test (``bench_quality.split_set``), and a
seeded share of its classes (``--unknown-classes``) is held out as unknown: their photos are in
no training and no catalogue. Ascension's defaults train on the known classes' train photos
(validating on their val photos), the catalogue is built from the same train photos, and
``ascension calibrate`` chooses its threshold for ``--target-fmr`` on the val split (known and
unknown photos). Measured on the test split, known and unknown, each threshold's

- FMR: the unknown test photos accepted (the calibrated threshold's must land near the target),
- FNMR: the known test photos refused, and Recall@1 of the accepted known ones,

for the calibrated threshold, the oracle (the lowest threshold meeting the target on the test
photos themselves: what no deployment can know), and plain fixed thresholds a user might guess.
A few hundred unknown photos measure an FMR of 1 % only roughly (one photo more or less moves
it by a third of a point), so ``--draws`` holds out several class draws, each trained and
calibrated on its own, and pools their counts.

    python benchmarks/bench_openset.py --quick   # a few minutes: 2 epochs, 150 photos a class
    python benchmarks/bench_openset.py           # 5 epochs, every photo (docs/benchmarks.md)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from _common import print_table, write_json
from bench_quality import (
    link_tree,
    settings_of,
    split_set,
    train_ascension,
    training_args,
    training_parser,
)

FIXED = (0.5, 0.8)


def test_scores(catalog, split, unknown: np.ndarray, target_fmr: float):
    """The test photos searched in the catalogue: its open-set evaluation (the oracle)."""
    from ascension_cli.catalog.search import CatalogSearcher
    from ascension_cli.retrieval.openset import evaluate_open_set

    paths, labels = split.part("test")
    vectors, found = CatalogSearcher(catalog).embed(paths, workers=0)
    names = list(catalog.class_names)
    names += [name for name in split.classes if name not in names]
    labels = np.array([names.index(split.classes[label]) for label in labels[found]])
    lacking = np.array([names.index(split.classes[label]) for label in unknown])
    return evaluate_open_set(vectors, labels, catalog.vectors, catalog.labels, lacking, names,
                             target_fmr)


def counts_at(report, threshold: float) -> dict:
    """What ``threshold`` does to the test queries, as counts (so draws can be pooled)."""
    known, right, unknown = report.known_scores, report.known_correct, report.unknown_scores
    accepted = known >= threshold
    return {"threshold": float(threshold), "unknown": len(unknown),
            "unknown_accepted": int((unknown >= threshold).sum()), "known": len(known),
            "known_refused": int((~accepted).sum()),
            "accepted_right": int((accepted & right).sum())}


def rates(counts: dict) -> dict:
    accepted = counts["known"] - counts["known_refused"]
    return {"fmr": counts["unknown_accepted"] / max(1, counts["unknown"]),
            "fnmr": counts["known_refused"] / max(1, counts["known"]),
            "recall_at_1_accepted": counts["accepted_right"] / accepted if accepted else
            float("nan")}


def run_draw(root: Path, args, seed: int) -> dict:
    """One held-out draw: train without its classes, calibrate on val, count on test."""
    from ascension_cli import api
    from ascension_cli.catalog.store import load_catalog
    from ascension_cli.retrieval.openset import held_out_classes

    split = split_set(root, args.split_seed, args.test_fraction, args.val_fraction,
                      args.max_per_class)
    unknown = held_out_classes(np.arange(len(split.classes)), args.unknown_classes, seed)
    known = np.setdiff1d(np.arange(len(split.classes)), unknown)
    work = Path(tempfile.mkdtemp(prefix="bench-openset-"))
    try:
        train = link_tree(work / "train", split, "train", classes=known)
        checkpoint, seconds, _ = train_ascension(
            train, link_tree(work / "val-known", split, "val", classes=known), args, seed,
            work / "run")
        api.index(checkpoint, train, work / "catalog", workers=0)
        api.calibrate(work / "catalog", link_tree(work / "val", split, "val"),
                      target_fmr=args.target_fmr, workers=0)
        catalog = load_catalog(work / "catalog")
        report = test_scores(catalog, split, unknown, args.target_fmr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    thresholds = {"calibrated on val": catalog.threshold, "oracle (chosen on test)":
                  report.threshold} | {f"fixed {t}": t for t in FIXED}
    return {"seed": seed, "unknown_classes": [split.classes[c] for c in unknown],
            "train_seconds": seconds, "val_unknown": catalog.calibration["unknown_queries"],
            "val_fmr": catalog.calibration["fmr"], "auc": report.curve.auc,
            "recall_at_1_known": float(np.mean(report.known_correct)),
            "thresholds": {name: counts_at(report, t) for name, t in thresholds.items()}}


def pooled(draws: list[dict]) -> dict:
    """Each threshold's counts summed over the draws, and the rates they give."""
    summed = {}
    for name in draws[0]["thresholds"]:
        counts = {key: sum(d["thresholds"][name][key] for d in draws)
                  for key in ("unknown", "unknown_accepted", "known", "known_refused",
                              "accepted_right")}
        summed[name] = counts | rates(counts)
    return summed


def main() -> None:
    parser = training_parser(__doc__, __file__)
    parser.add_argument("--unknown-classes", type=float, default=0.3,
                        help="share of each set's classes held out as unknown (seeded)")
    parser.add_argument("--target-fmr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0,
                        help="the first draw's seed: which classes are held out, and training")
    parser.add_argument("--draws", type=int, default=3,
                        help="held-out draws (seeds from --seed on), each trained and "
                        "calibrated; their counts are pooled")
    args, sets = training_args(parser)
    results, rows = {}, []
    for root in sets:
        draws = []
        for seed in range(args.seed, args.seed + args.draws):
            draw = run_draw(root, args, seed)
            draws.append(draw)
            at = rates(draw["thresholds"]["calibrated on val"])
            print(f"{root.name} draw {seed}: unknown {', '.join(draw['unknown_classes'])}; "
                  f"AUC {draw['auc']:.3f}; calibrated FMR on test {at['fmr']:.2%} of "
                  f"{draw['thresholds']['calibrated on val']['unknown']}", flush=True)
        results[root.name] = {"draws": draws, "pooled": pooled(draws)}
        oracle = results[root.name]["pooled"]["oracle (chosen on test)"]
        for name, at in results[root.name]["pooled"].items():
            per_draw = " / ".join(f"{rates(d['thresholds'][name])['fmr']:.1%}" for d in draws)
            rows.append([root.name, name, f"{at['fmr']:.2%} ({per_draw})", f"{at['fnmr']:.2%}",
                         f"{at['recall_at_1_accepted']:.4f}",
                         f"{at['fnmr'] - oracle['fnmr']:+.2%}"])
    print_table(f"open set on the test split, {args.draws} draws pooled: target FMR "
                f"{args.target_fmr:.1%}, {args.unknown_classes:.0%} of the classes unknown, "
                f"{args.epochs} epochs", ["set", "threshold", "FMR (each draw)", "FNMR",
                                          "R@1 accepted", "FNMR - oracle"], rows)
    calibrated = [r["pooled"]["calibrated on val"]["fmr"] for r in results.values()]
    write_json("bench_openset", {
        "settings": settings_of(args, sets),
        "results": results,
        "calibrated_fmr_within_half_to_twice_target": all(
            args.target_fmr / 2 <= fmr <= 2 * args.target_fmr for fmr in calibrated),
    }, args.json)


if __name__ == "__main__":
    main()
