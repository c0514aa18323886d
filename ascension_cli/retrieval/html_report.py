"""One self-contained HTML page that shows where retrieval fails: the metrics, per-class Recall@1,
the most-confused class pairs with example photos, the worst queries with their top-k, the top
match's similarity (and the open set), the data to clean, the training curves and options of a
run, and a 2-D map of the embeddings.

Images are embedded as small JPEG thumbnails and the charts are inline SVG, so the file opens
anywhere without a network. Large sets are sampled for what is drawn, and the page says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascension_cli.atomic import atomic_write_text
from ascension_cli.retrieval.analysis import confused_pairs, worst_queries
from ascension_cli.retrieval.evaluate import EvaluationRun
from ascension_cli.retrieval.html_parts import Thumbnails, esc, figure
from ascension_cli.retrieval.openset import OpenSetReport
from ascension_cli.retrieval.report_sections import cleaning_section, open_set_section

MAP_POINTS = 1500  # at most this many points on the 2-D map (sampled beyond)
BAR_CLASSES = 60  # at most this many classes in the per-class chart (the weakest)


@dataclass
class ReportInfo:
    path: Path
    seconds: float
    drawn_points: int
    total_points: int


def _colour(label: int, classes: int) -> str:
    return f"hsl({(label * 360 / max(1, classes) * 7) % 360:.0f},65%,45%)"


def _metrics_table(run: EvaluationRun) -> str:
    report = run.clean.report
    names = list(run.recoloured)
    head = "".join(f"<th>{esc(n)}</th>" for n in ["metric", "clean", *names])
    rows = []
    for k, value in sorted(report.recall_at_k.items()):
        cells = [f"{value:.4f}"] + [f"{run.recoloured[n].report.recall_at_k[k]:.4f}"
                                    for n in names]
        rows.append(f"<tr><td>Recall@{k}</td>" + "".join(f"<td>{c}</td>" for c in cells))
    for label, value in (("Precision@1", report.precision_at_1),
                         ("R-Precision", report.r_precision), ("MAP@R", report.map_at_r)):
        rows.append(f"<tr><td>{label}</td><td>{value:.4f}</td>" + "<td></td>" * len(names))
    note = f"{report.queries} queries"
    if report.excluded_queries:
        note += f"; {report.excluded_queries} left out (no other item of their class)"
    return f"<table><tr>{head}</tr>{''.join(rows)}</table><p class=note>{esc(note)}</p>"


def _class_bars(run: EvaluationRun) -> str:
    names = run.searched.class_names
    per_class = sorted(run.clean.report.per_class_recall_at_1.items(), key=lambda i: (i[1], i[0]))
    shown = per_class[:BAR_CLASSES]
    note = (f"<p class=note>The weakest {len(shown)} of {len(per_class)} classes.</p>"
            if len(shown) < len(per_class) else "")
    row, width = 18, 420
    bars = []
    for i, (label, value) in enumerate(shown):
        name = names[label] if 0 <= label < len(names) else str(label)
        y = i * row
        bars.append(f'<text x="0" y="{y + 13}" class=label>{esc(name[:28])}</text>'
                    f'<rect x="200" y="{y + 2}" width="{max(1.0, value * width):.1f}" '
                    f'height="{row - 5}" fill="{"#c0392b" if value < 0.5 else "#2e86c1"}"/>'
                    f'<text x="{206 + value * width:.1f}" y="{y + 13}">{value:.3f}</text>')
    return (note + f'<svg class=bars width="{200 + width + 60}" height="{len(shown) * row + 4}">'
            + "".join(bars) + "</svg>")


def _confusions(run: EvaluationRun, thumbs: Thumbnails, queries: list[Path],
                gallery: list[Path]) -> str:
    names = run.searched.class_names
    pairs = confused_pairs(run.clean.neighbour_ids, run.queries.labels, run.searched.labels)
    if not pairs:
        return "<p>No query's first neighbour is of another class.</p>"
    rows = []
    for pair in pairs:
        examples = "".join(
            figure(thumbs(queries[q]), f"query: {names[pair.query_class]}")
            + figure(thumbs(gallery[n]), f"found: {names[pair.neighbour_class]}", "wrong")
            for q, n in pair.examples)
        rows.append(f"<tr><td><b>{esc(names[pair.query_class])}</b> taken for "
                    f"<b>{esc(names[pair.neighbour_class])}</b></td><td>{pair.count}</td>"
                    f"<td class=strip>{examples}</td></tr>")
    return ("<table class=pairs><tr><th>classes</th><th>queries</th><th>examples</th></tr>"
            + "".join(rows) + "</table>")


def _worst(run: EvaluationRun, thumbs: Thumbnails, queries: list[Path], gallery: list[Path],
           k: int) -> str:
    names = run.searched.class_names
    rows = []
    for row, rank in worst_queries(run.clean.neighbour_ids, run.queries.labels,
                                   run.searched.labels):
        label = run.queries.labels[row]
        strip = [figure(thumbs(queries[row]), f"query: {names[label]}", "query")]
        for item in run.clean.neighbour_ids[row, :k]:
            if item >= 0:
                found = run.searched.labels[item]
                strip.append(figure(thumbs(gallery[item]), names[found],
                                     "right" if found == label else "wrong"))
        depth = run.clean.neighbour_ids.shape[1]
        where = f"first correct at rank {rank}" if rank <= depth else f"none in the top {depth}"
        rows.append(f"<div class=worst><p>{esc(run.queries.paths[row])}: {where}</p>"
                    f"<div class=strip>{''.join(strip)}</div></div>")
    return "".join(rows) or "<p>Every query's first neighbour is of its class.</p>"


def _line_chart(title: str, points: list[tuple[float, float]], colour: str) -> str:
    if not points:
        return ""
    width, height, pad = 300, 150, 30
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)

    def place(x: float, y: float) -> str:
        px = pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)
        py = height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    path = " ".join(place(x, y) for x, y in points)
    return (f'<svg class=chart width="{width}" height="{height}"><text x="{pad}" y="16">'
            f"{esc(title)}</text><polyline fill=none stroke=\"{colour}\" stroke-width=2 "
            f'points="{path}"/><text x="{pad}" y="{height - 8}" class=axis>{y0:.3g} to '
            f"{y1:.3g}, epochs {x0:g}-{x1:g}</text></svg>")


def _run_section(run_dir: Path | None) -> str:
    if run_dir is None:
        return ""
    records = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    charts = "".join(_line_chart(title, [(r["epoch"], r[key]) for r in records
                                         if r.get(key) is not None], colour)
                     for title, key, colour in (("SupCon loss", "loss", "#2e86c1"),
                                                ("learning rate", "lr", "#e67e22"),
                                                ("validation Recall@1", "val_recall_at_1",
                                                 "#27ae60"),
                                                ("validation Recall@5", "val_recall_at_5",
                                                 "#8e44ad"),
                                                ("validation MAP@R", "val_map_at_r",
                                                 "#c0392b")))
    options = ""
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        values = yaml.safe_load(config.read_text()) or {}
        options = "<table class=options>" + "".join(
            f"<tr><td>{esc(key)}</td><td>{esc(value)}</td></tr>"
            for key, value in values.items()) + "</table>"
    return (f"<h2 id=training>Training run {esc(run_dir)}</h2><div class=charts>{charts}</div>"
            f"<details><summary>options</summary>{options}</details>")


def _embedding_map(run: EvaluationRun, thumbs: Thumbnails, paths: list[Path],
                   seed: int) -> tuple[str, int]:
    from sklearn.decomposition import PCA

    vectors, labels = run.searched.vectors, run.searched.labels
    rng = np.random.default_rng(seed)
    rows = (np.sort(rng.choice(len(vectors), MAP_POINTS, replace=False))
            if len(vectors) > MAP_POINTS else np.arange(len(vectors)))
    xy = PCA(n_components=2, random_state=seed).fit_transform(vectors[rows])
    xy = (xy - xy.min(axis=0)) / np.maximum(np.ptp(xy, axis=0), 1e-9)
    names, size = run.searched.class_names, 560
    dots = "".join(
        f'<circle cx="{10 + x * size:.1f}" cy="{10 + y * size:.1f}" r="4" '
        f'fill="{_colour(int(labels[r]), len(names))}" data-i="{i}"/>'
        for i, (r, (x, y)) in enumerate(zip(rows, xy, strict=True)))
    points = [{"name": names[labels[r]] if labels[r] >= 0 else "-",
               "img": thumbs(paths[r])} for r in rows]
    note = (f"<p class=note>{len(rows)} of {len(vectors)} vectors, sampled at random.</p>"
            if len(rows) < len(vectors) else "")
    legend = "".join(f'<span><i style="background:{_colour(label, len(names))}"></i>'
                     f"{esc(name)}</span>" for label, name in enumerate(names[:BAR_CLASSES]))
    return (note + f'<div class=map><svg id=map width="{size + 20}" height="{size + 20}">'
            f"{dots}</svg><div class=legend>{legend}</div></div>"
            f"<script>const POINTS = {json.dumps(points)};</script>", len(rows))


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:middle}.note{color:#666}figure{display:inline-block;margin:3px;
text-align:center;border:3px solid transparent}figure img{display:block;width:72px;height:72px}
figcaption{font-size:11px;max-width:72px;overflow:hidden;white-space:nowrap}
figure.wrong{border-color:#c0392b}figure.right{border-color:#27ae60}
figure.query{border-color:#555}.strip{white-space:nowrap}.worst p{margin:10px 0 2px}
svg text{font-size:12px}.chart{margin-right:12px;border:1px solid #eee}.axis{fill:#666}
#tip{position:fixed;display:none;background:#fff;border:1px solid #999;padding:4px;
pointer-events:none;font-size:12px}#tip img{display:block;width:96px;height:96px}
circle:hover{stroke:#000;stroke-width:2}.map{display:flex;gap:16px;align-items:flex-start}
.legend span{display:block;font-size:12px}.legend i{display:inline-block;width:10px;
height:10px;border-radius:5px;margin-right:6px}"""

SCRIPT = """window.REPORT_ERRORS = [];
window.addEventListener('error', e => { window.REPORT_ERRORS.push(String(e.message));
  document.getElementById('errors').textContent = window.REPORT_ERRORS.join('\\n'); });
document.addEventListener('DOMContentLoaded', () => {
  const tip = document.getElementById('tip'), map = document.getElementById('map');
  if (!map) return;
  map.addEventListener('mousemove', e => {
    const i = e.target.dataset ? e.target.dataset.i : undefined;
    if (i === undefined) { tip.style.display = 'none'; return; }
    const p = POINTS[Number(i)];
    tip.innerHTML = '<img src="' + p.img + '"><span></span>';
    tip.querySelector('span').textContent = p.name;
    tip.style.left = (e.clientX + 12) + 'px'; tip.style.top = (e.clientY + 12) + 'px';
    tip.style.display = 'block';
  });
  map.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
});
window.addEventListener('load', () => {  // what a browser shows, for the rendering test
  const shown = [...document.images].filter(i => i.complete && i.naturalWidth > 0);
  const pairs = document.getElementById('confused').nextElementSibling.getBoundingClientRect();
  document.body.dataset.images = String(shown.length);
  document.body.dataset.pairsHeight = String(Math.round(pairs.height));
  document.body.dataset.ready = 'yes';
});"""


def write_report(
    run: EvaluationRun, output: str | Path, title: str, run_dir: Path | None = None,
    k: int = 5, seed: int = 0, open_set: OpenSetReport | None = None,
) -> ReportInfo:
    """Write the report for an evaluation (``retrieval.evaluate.evaluate_vectors``), with the
    open-set evaluation of its queries if there is one."""
    started = time.perf_counter()
    query_paths = [Path(run.queries.image_root) / p for p in run.queries.paths]
    searched_paths = [Path(run.searched.image_root) / p for p in run.searched.paths]
    thumbs, small = Thumbnails(72), Thumbnails(64)  # the map has many: smaller
    embedding_map, drawn = _embedding_map(run, small, searched_paths, seed)
    sections = [
        ("metrics", "Retrieval", _metrics_table(run)),
        ("classes", "Per-class Recall@1, weakest first", _class_bars(run)),
        ("confused", "Most-confused class pairs (top-1 neighbour of another class)",
         _confusions(run, thumbs, query_paths, searched_paths)),
        ("worst", f"Worst queries, with their top {k}",
         _worst(run, thumbs, query_paths, searched_paths, k)),
        ("openset", "Similarity of the top match: right, wrong and unknown queries",
         open_set_section(run, open_set)),
        ("cleaning", "Data to clean", cleaning_section(run, thumbs, searched_paths)),
        ("map", "Map of the embeddings (PCA), coloured by class; hover for the image",
         embedding_map),
    ]
    body = "".join(f"<h2 id={key}>{esc(heading)}</h2>{content}"
                   for key, heading, content in sections)
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}"
            f"</title><style>{STYLE}</style><script>{SCRIPT}</script></head><body>"
            f"<h1>{esc(title)}</h1>{body}{_run_section(run_dir)}<div id=tip></div>"
            f"<pre id=errors></pre></body></html>")
    path = Path(output)
    atomic_write_text(path, page)
    return ReportInfo(path, time.perf_counter() - started, drawn, len(run.searched.vectors))
