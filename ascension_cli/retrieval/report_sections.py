"""Two sections of the HTML report: the open set (how the top match's similarity tells right
from wrong and known from unknown, and what a threshold does to each), and the data to clean
(photos whose neighbours all agree on another class, near-duplicates filed under two classes),
with their photos side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ascension_cli.retrieval.cleaning import (
    NEIGHBOURS,
    cross_class_duplicates,
    suspected_label_errors,
)
from ascension_cli.retrieval.evaluate import EvaluationRun
from ascension_cli.retrieval.html_parts import Thumbnails, esc, figure
from ascension_cli.retrieval.index import nearest_neighbours
from ascension_cli.retrieval.openset import OpenSetReport, top1

SHOWN = 24  # entries of each cleaning list drawn, most suspect first
BINS = 40
CURVE_POINTS = 300
WIDTH, HEIGHT, PAD = 620, 230, 40
CORRECT, WRONG, UNKNOWN = "#27ae60", "#c0392b", "#7f8c8d"


def _x(value: float, low: float, high: float) -> float:
    return PAD + (value - low) / ((high - low) or 1) * (WIDTH - 2 * PAD)


def _y(value: float, top: float) -> float:
    return HEIGHT - PAD - value / (top or 1) * (HEIGHT - 2 * PAD)


def _threshold_line(threshold: float | None, low: float, high: float) -> str:
    if threshold is None or not low <= threshold <= high:
        return ""
    x = _x(threshold, low, high)
    label = x + 4 if x < WIDTH - 120 else x - 104  # to its left near the right edge
    return (f'<line x1="{x:.1f}" y1="{PAD - 10}" x2="{x:.1f}" y2="{HEIGHT - PAD}" stroke="#000" '
            f'stroke-dasharray="5,4"/><text x="{label:.1f}" y="{PAD - 2}">threshold '
            f"{threshold:.3f}</text>")


def _axis(low: float, high: float, label: str) -> str:
    ticks = "".join(f'<text x="{_x(v, low, high) - 12:.1f}" y="{HEIGHT - PAD + 16}" '
                    f'class=axis>{v:.2f}</text>' for v in np.linspace(low, high, 5))
    return (f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
            f'stroke="#999"/>{ticks}<text x="{WIDTH / 2 - 60:.0f}" y="{HEIGHT - 6}" '
            f"class=axis>{esc(label)}</text>")


def similarity_histogram(series: list[tuple[str, np.ndarray, str]],
                         threshold: float | None) -> str:
    """Each series' share of queries per similarity bin, as a filled step curve."""
    shown = [(name, np.asarray(values, float), colour) for name, values, colour in series
             if len(values)]
    if not shown:
        return ""
    every = np.concatenate([values for _, values, _ in shown])
    low, high = float(every.min()), float(every.max())
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    edges = np.linspace(low, high + 1e-9, BINS + 1)
    shares = [np.histogram(values, edges)[0] / len(values) for _, values, _ in shown]
    top = max(float(share.max()) for share in shares)
    curves, legend = [], []
    for (name, values, colour), share in zip(shown, shares, strict=True):
        points = [f"{_x(low, low, high):.1f},{_y(0, top):.1f}"]
        for left, right, value in zip(edges[:-1], edges[1:], share, strict=True):
            points += [f"{_x(left, low, high):.1f},{_y(value, top):.1f}",
                       f"{_x(right, low, high):.1f},{_y(value, top):.1f}"]
        points.append(f"{_x(high, low, high):.1f},{_y(0, top):.1f}")
        curves.append(f'<polygon points="{" ".join(points)}" fill="{colour}" '
                      f'fill-opacity="0.25" stroke="{colour}" stroke-width="1.5"/>')
        legend.append(f'<tspan fill="{colour}">■ {esc(name)} ({len(values)})</tspan> ')
    return (f'<svg class=chart id=similarities width="{WIDTH}" height="{HEIGHT}">'
            f'<text x="{PAD}" y="14">{"".join(legend)}</text>{"".join(curves)}'
            f"{_threshold_line(threshold, low, high)}"
            f"{_axis(low, high, 'top-1 similarity (share of each kind per bin)')}</svg>")


def rates_chart(report: OpenSetReport) -> str:
    """FMR and FNMR against the threshold, the chosen threshold drawn."""
    curve = report.curve
    keep = np.unique(np.linspace(0, len(curve.thresholds) - 2, CURVE_POINTS).round().astype(int))
    thresholds = curve.thresholds[keep]  # the last one (above every score) left out
    low, high = float(thresholds.min()), float(thresholds.max())
    polylines, legend = [], []
    for name, rates, colour in (("FMR: unknowns accepted", curve.fmr[keep], UNKNOWN),
                                ("FNMR: known refused", curve.fnmr[keep], "#2e86c1")):
        points = " ".join(f"{_x(t, low, high):.1f},{_y(r, 1):.1f}"
                          for t, r in zip(thresholds, rates, strict=True))
        polylines.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                         'stroke-width="2"/>')
        legend.append(f'<tspan fill="{colour}">■ {esc(name)}</tspan> ')
    return (f'<svg class=chart id=rates width="{WIDTH}" height="{HEIGHT}"><text x="{PAD}" '
            f'y="14">{"".join(legend)}</text>{"".join(polylines)}'
            f"{_threshold_line(report.threshold, low, high)}"
            f"{_axis(low, high, 'threshold (rates from 0 to 1)')}</svg>")


def _closed_set_scores(run: EvaluationRun) -> tuple[np.ndarray, np.ndarray]:
    same = run.searched is run.queries
    ids, similarity = top1(run.queries.vectors, None if same else run.searched.vectors, same)
    correct = (ids >= 0) & (run.searched.labels[np.clip(ids, 0, None)] == run.queries.labels)
    return similarity, correct


def open_set_section(run: EvaluationRun, report: OpenSetReport | None) -> str:
    """The top match's similarity for right, wrong and (with ``report``) unknown queries, and
    with ``report`` the rates at each threshold and the figures at the target FMR."""
    if report is None:
        similarity, correct = _closed_set_scores(run)
        hint = ("<p class=note>Pass --unknown-classes 0.2 to hold a share of the classes out of "
                "the gallery and measure queries of items it lacks: the unknowns a threshold "
                "accepts (FMR), the known it refuses (FNMR), and the threshold for a target "
                "FMR.</p>")
        return hint + similarity_histogram(
            [("right class", similarity[correct], CORRECT),
             ("wrong class", similarity[~correct], WRONG)], None)
    rows = (("classes held out (unknown)", ", ".join(report.unknown_classes)),
            ("known / unknown queries", f"{report.known_queries} / {report.unknown_queries}"),
            ("ROC AUC, known against unknown", f"{report.curve.auc:.4f}"),
            (f"threshold for FMR {report.target_fmr:.1%}", f"{report.threshold:.4f}"),
            ("unknowns accepted (FMR)", f"{report.fmr:.2%}"),
            ("known refused (FNMR)", f"{report.fnmr:.2%}"),
            ("Recall@1 of the accepted known", f"{report.recall_at_1_accepted:.4f}"))
    table = "<table>" + "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td></tr>"
                                for a, b in rows) + "</table>"
    known, right = report.known_scores, report.known_correct
    return (table + similarity_histogram(
        [("known, right class", known[right], CORRECT),
         ("known, wrong class", known[~right], WRONG),
         ("unknown", report.unknown_scores, UNKNOWN)], report.threshold)
        + rates_chart(report))


def _where_own(rank: int, depth: int, name: str) -> str:
    return (f"its nearest {name} photo at rank {rank}" if rank <= depth
            else f"no {name} photo in its {depth} nearest")


def cleaning_section(run: EvaluationRun, thumbs: Thumbnails, paths: list[Path]) -> str:
    """The searched photos (the gallery: what a model learns from) whose nearest neighbours all
    agree on another class, and the near-duplicate pairs filed under two classes."""
    searched, names = run.searched, run.searched.class_names
    if len(searched.vectors) < 2:
        return "<p>Too few photos to compare.</p>"
    depth = min(len(searched.vectors) - 1, NEIGHBOURS)
    ids, scores = nearest_neighbours(searched.vectors, None, depth)
    suspected = suspected_label_errors(ids, scores, searched.labels)
    duplicates = cross_class_duplicates(ids, scores, searched.labels)
    parts = [f"<h3 id=suspected>Suspected label errors: {len(suspected)} of "
             f"{len(searched.vectors)} photos</h3><p class=note>Photos whose 5 nearest photos "
             "are all of one other class, most suspect first (by how much nearer that class is "
             "than their own)" + (f"; the first {SHOWN} are drawn" if len(suspected) > SHOWN
                                  else "") + ".</p>"]
    for entry in suspected[:SHOWN]:
        filed, looks = names[entry.label], names[entry.suggested]
        strip = [figure(thumbs(paths[entry.row]), f"filed: {filed}", "query")]
        strip += [figure(thumbs(paths[i]), looks, "wrong") for i in entry.neighbours]
        parts.append(f"<div class=worst><p>{esc(searched.paths[entry.row])}: filed under "
                     f"<b>{esc(filed)}</b>, looks like <b>{esc(looks)}</b>; "
                     f"{esc(_where_own(entry.own_rank, depth, filed))}</p>"
                     f"<div class=strip>{''.join(strip)}</div></div>")
    parts.append(f"<h3 id=duplicates>Near-duplicates filed under two classes: {len(duplicates)}"
                 "</h3>")
    rows = [f"<tr><td class=strip>{figure(thumbs(paths[p.first]), names[searched.labels[p.first]])}"
            f"{figure(thumbs(paths[p.second]), names[searched.labels[p.second]], 'wrong')}</td>"
            f"<td>{p.similarity:.4f}</td><td>{esc(searched.paths[p.first])}<br>"
            f"{esc(searched.paths[p.second])}</td></tr>" for p in duplicates[:SHOWN]]
    if rows:
        parts.append("<table><tr><th>photos</th><th>similarity</th><th>files</th></tr>"
                     + "".join(rows) + "</table>")
    return "".join(parts)
