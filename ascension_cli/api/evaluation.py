"""Evaluation and reports from Python, as ``ascension eval`` and ``ascension report`` do them
(the command line calls ``measure``, ``run_eval`` and ``run_report``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascension_cli.config import EvalConfig, ReportConfig, resolve

if TYPE_CHECKING:
    from ascension_cli.embedding.vectors import Vectors
    from ascension_cli.progress import Progress
    from ascension_cli.retrieval.evaluate import EvaluationRun
    from ascension_cli.retrieval.html_report import ReportInfo
    from ascension_cli.retrieval.openset import OpenSetReport


@dataclass
class Measurement:
    """The queries (embedded, or read from a file) and their evaluation."""

    queries: Vectors
    run: EvaluationRun
    written: dict[str, Path] = field(default_factory=dict)  # what was written: json, picture
    open_set: OpenSetReport | None = None  # with unknown_classes


def measure(settings: EvalConfig | ReportConfig, progress: Progress | None = None) -> Measurement:
    """The queries, and their evaluation against the gallery (and each recolouring): from a
    vectors file, or embedded first from a checkpoint and images."""
    from ascension_cli.data.augment import RECOLORINGS
    from ascension_cli.embedding.pipeline import embed_folder
    from ascension_cli.embedding.vectors import load_vectors
    from ascension_cli.progress import Progress
    from ascension_cli.retrieval.evaluate import evaluate_vectors

    progress = progress or Progress()

    def embedded(recolouring: str | None = None) -> Vectors:
        what = "embedding" if recolouring is None else f"embedding ({recolouring})"
        return embed_folder(settings.checkpoint, settings.image_root, split=settings.split,
                            evaluation=True, progress=progress.stage(what),
                            feature_kind=settings.features, recolouring=recolouring,
                            **settings.run_options())

    queries = load_vectors(settings.source) if settings.image_root is None else embedded()
    gallery = load_vectors(settings.gallery) if settings.gallery else None
    recoloured = {name: (lambda name=name: embedded(name).vectors) for name in RECOLORINGS
                  } if settings.recolor else None
    searching = progress.stage("searching")
    searching.start(len(queries))
    run = evaluate_vectors(queries, gallery, settings.ks, settings.index, recoloured,
                           on_progress=searching.advance)
    if run.gallery_was_queries:
        progress.note("the gallery holds the same images as the queries: searched as one set, "
                      "each query's own vector excluded")
    return Measurement(queries, run)


def run_eval(settings: EvalConfig, progress: Progress | None = None) -> Measurement:
    """``measure``, then the metrics JSON (``json_file``) and the retrieval picture (``show``)."""
    from ascension_cli.retrieval.report import evaluation_json, retrieval_grid, write_json

    measured = measure(settings, progress)
    queries, run = measured.queries, measured.run
    if settings.unknown_classes is not None:
        measured.open_set = open_set_of(run, settings.unknown_classes, settings.target_fmr,
                                        settings.seed)
    if settings.json_file is not None:
        write_json(settings.json_file, evaluation_json(
            run.clean, run.searched.class_names, run.recoloured,
            {"queries_file": str(settings.source),
             "gallery_file": str(settings.gallery) if settings.gallery else None,
             "model_name": queries.model_name, "feature_kind": queries.feature_kind,
             **({} if measured.open_set is None else {"open_set": measured.open_set.to_dict()})},
        ))
        measured.written["json"] = settings.json_file
    if settings.show:
        measured.written["picture"] = retrieval_grid(
            settings.output, run.clean,
            [Path(queries.image_root) / p for p in queries.paths], run.queries.labels,
            [Path(run.searched.image_root) / p for p in run.searched.paths],
            run.searched.labels, run.searched.class_names, queries=settings.show,
            k=min(5, max(settings.ks)),
        )
    return measured


def open_set_of(run: EvaluationRun, share: float, target_fmr: float,
                seed: int = 0) -> OpenSetReport:
    """The open-set evaluation of a run's queries: a seeded ``share`` of their classes held out
    of what they are searched in."""
    from ascension_cli.errors import VectorsError
    from ascension_cli.retrieval.openset import evaluate_open_set, held_out_classes

    queries, searched = run.queries, run.searched
    try:
        unknown = held_out_classes(queries.labels, share, seed)
    except ValueError as exc:
        raise VectorsError(f"{{unknown_classes}}: {exc}", options=("unknown_classes",)) from None
    same = searched is queries
    held = set(searched.class_names)
    # Queries of classes the gallery lacks are unknowns too (as `calibrate` counts them).
    lacking = [] if same else [name for name in queries.class_names if name not in held]
    try:
        return evaluate_open_set(
            queries.vectors, queries.labels, None if same else searched.vectors,
            None if same else searched.labels, unknown, searched.class_names, target_fmr,
            lacking)
    except ValueError as exc:
        raise VectorsError(f"{{unknown_classes}}: {exc}", options=("unknown_classes",)) from None


def run_report(settings: ReportConfig, progress: Progress | None = None) -> ReportInfo:
    """``measure`` (and with ``unknown_classes`` the open set), then the HTML report."""
    from ascension_cli.retrieval.html_report import write_report

    run = measure(settings, progress).run
    open_set = (None if settings.unknown_classes is None else
                open_set_of(run, settings.unknown_classes, settings.target_fmr, settings.seed))
    return write_report(run, settings.output, f"Retrieval report: {settings.source.name}",
                        run_dir=settings.run or settings.run_dir, k=min(5, max(settings.ks)),
                        open_set=open_set)


def _given(source, gallery, image_root, ks, index_kind, options: dict[str, Any]) -> dict:
    given = dict(options, source=source, index=index_kind,
                 k=",".join(str(k) for k in ks) if not isinstance(ks, str) else ks)
    if gallery is not None:
        given["gallery"] = gallery
    if image_root is not None:
        given["image_root"] = image_root
    return given


def evaluate(
    source: Vectors | str | Path,
    gallery: Vectors | str | Path | None = None,
    ks: tuple[int, ...] | str = (1, 5, 10),
    index_kind: str = "flat",
    image_root: str | Path | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> EvaluationRun:
    """Recall@k, Precision@1, R-Precision, MAP@R and per-class Recall@1, as ``ascension eval``.

    ``source`` and ``gallery`` are ``Vectors`` or vectors files; without a gallery the queries
    are searched among themselves. Or ``source`` is a checkpoint (or run folder) and
    ``image_root`` the images it embeds first; then ``options`` may say ``recolor=True``,
    ``features``, ``split``, ``batch_size``, ``precision``, ``workers``, ``device``, and
    ``json_file`` / ``show`` write the metrics and a picture as ``eval`` does. The metrics are
    in ``.clean.report``.
    """
    if hasattr(source, "vectors") or hasattr(gallery, "vectors"):
        from ascension_cli.embedding.vectors import load_vectors
        from ascension_cli.retrieval.evaluate import evaluate_vectors

        def loaded(item):
            return item if item is None or hasattr(item, "vectors") else load_vectors(item)

        if image_root is not None or options:
            raise TypeError("options and image_root apply to files, not Vectors in memory")
        return evaluate_vectors(loaded(source), loaded(gallery), tuple(ks), index_kind)
    settings = resolve(EvalConfig, _given(source, gallery, image_root, ks, index_kind, options))
    return run_eval(settings, progress).run


def report(
    source: str | Path, output: str | Path = "report.html", gallery: str | Path | None = None,
    image_root: str | Path | None = None, ks: tuple[int, ...] | str = (1, 5, 10),
    index_kind: str = "flat", progress: Progress | None = None, **options: Any,
) -> ReportInfo:
    """Write ``ascension report``'s HTML page for a vectors file, or a checkpoint (or run
    folder) and ``image_root``; ``options`` as ``evaluate``'s, and ``run`` (a run folder)."""
    given = _given(source, gallery, image_root, ks, index_kind, options)
    return run_report(resolve(ReportConfig, {**given, "output": output}), progress)
