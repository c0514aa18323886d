"""Paired comparisons of two systems on the same queries (``bench_quality.py``).

A set's test split is a sample of the photos a user would search with, so a lead of two points
of Recall@1 on 177 queries can be luck. Both systems answer the same queries, so their
difference is measured query by query: the mean of each query's figure (its Recall@1 hit, its
Recall@5 hit, its AP@R) over a system's seeds, ours minus theirs, and a 95 % bootstrap interval
of the mean difference with the queries resampled. The interval covers which queries the split
drew, not which training seeds ran: the seeds' spread is reported beside it.
"""

from __future__ import annotations

import numpy as np

# The per-query figures compared, as ``bench_quality.score`` records them.
FIGURES = ("recall_at_1", "recall_at_5", "map_at_r")
RESAMPLES = 2000
LEVEL = 0.95
CHUNK = 250  # resamples drawn at once: CHUNK x queries indices in memory


def paired_difference(ours: list, theirs: list, resamples: int = RESAMPLES, seed: int = 0
                      ) -> tuple[float, float, float]:
    """(mean difference, low, high): ``ours`` and ``theirs`` hold one array of per-query
    figures for each run (seed) of a system, every array over the same queries in the same
    order; a system with one run (the frozen features) is compared as it is."""
    runs = [np.asarray(run, dtype=np.float64) for run in (*ours, *theirs)]
    if len({len(run) for run in runs}) != 1 or not len(runs[0]):
        raise ValueError("paired runs must score the same, non-empty set of queries")
    difference = (np.mean(runs[:len(ours)], axis=0) - np.mean(runs[len(ours):], axis=0))
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        difference[rng.integers(0, len(difference), (min(CHUNK, resamples - done),
                                                     len(difference)))].mean(axis=1)
        for done in range(0, resamples, CHUNK)])
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(difference.mean()), float(low), float(high)


def base(row: str) -> str:
    """A result row's system: 'multisim @passes' -> 'multisim'."""
    return row.split(" ")[0]


def compare(by_system: dict[str, dict], variants: set[str] = frozenset()
            ) -> dict[str, dict[str, dict]]:
    """Paired differences on one set: Ascension's defaults against every baseline, and each
    ``variant`` against the defaults and every baseline, each at the same budget:
    {ours: {theirs: {figure: {"mean", "low", "high"}}}}."""
    def queries(summary: dict) -> dict[str, list]:
        return {figure: [run["per_query"][figure] for run in summary["runs"]]
                for figure in FIGURES}

    found: dict[str, dict[str, dict]] = {}
    for ours in by_system:
        if base(ours) != "ascension" and base(ours) not in variants:
            continue
        mine = queries(by_system[ours])
        for theirs in by_system:
            if (base(theirs) == base(ours) or base(theirs) in variants
                    or theirs.endswith("@passes") != ours.endswith("@passes")):
                continue
            other = queries(by_system[theirs])
            found.setdefault(ours, {})[theirs] = {
                figure: dict(zip(("mean", "low", "high"),
                                 paired_difference(mine[figure], other[figure]), strict=True))
                for figure in FIGURES}
    return found


def interval(figures: dict[str, float]) -> str:
    """'+2.3 [-1.1, +5.6]': a difference and its interval, in points (hundredths)."""
    return (f"{100 * figures['mean']:+.1f} [{100 * figures['low']:+.1f}, "
            f"{100 * figures['high']:+.1f}]")


def beyond_noise(comparison: dict[str, dict[str, dict]]) -> bool:
    """Whether the defaults (at each budget) lead every baseline in every figure with the whole
    interval above zero."""
    defaults = [against for ours, against in comparison.items() if base(ours) == "ascension"]
    return bool(defaults) and all(
        figures["low"] > 0 for against in defaults for by_figure in against.values()
        for figures in by_figure.values())


def below_start(comparison: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Where the defaults (each budget's row) retrieve worse than the starting model, the
    frozen features at the same budget, in a figure (issue 44: "never below the starting
    model"): {row: {figure: its paired difference}}, with ``beyond_luck`` where the whole
    interval is below zero; {} where they are level or ahead in every figure."""
    found: dict[str, dict[str, dict]] = {}
    for ours, against in comparison.items():
        start = next((by_figure for theirs, by_figure in against.items()
                      if base(theirs) == "frozen"), None)
        if base(ours) != "ascension" or start is None:
            continue
        for figure, difference in start.items():
            if difference["mean"] < 0:
                found.setdefault(ours, {})[figure] = difference | {
                    "beyond_luck": difference["high"] < 0}
    return found
