"""The Python API: every command of the command line as a function, with its options and checks
(the same pydantic models validate them) and the same results.

    from ascension_cli import train_supcon, embed, evaluate

    run = train_supcon("data/train", epochs=5, model="tf_efficientnet_lite0",
                       weights="tf_efficientnet_lite0.safetensors", save_dir="runs/a")
    queries = embed(run.best_checkpoint, "data/test")
    print(evaluate(queries).clean.report.recall_at_k)

Each command ``X`` has ``X(...)`` taking its options by name, and ``run_X(settings, ...)``
taking its validated options model, which is what the command line calls: parse, ``run_X``,
print. Heavy modules (torch, timm, faiss) are imported when a function runs, not when this is
imported.
"""

from ascension_cli.api.catalogue import (
    IndexResult,
    calibrate,
    index,
    run_calibrate,
    run_index,
    run_search,
    run_serve,
    search,
    serve,
    serve_app,
)
from ascension_cli.api.changes import (
    history,
    relabel,
    remove,
    replace,
    rollback,
    run_history,
    run_relabel,
    run_remove,
    run_replace,
    run_rollback,
    run_snapshot,
    run_upgrade,
    snapshot,
    upgrade,
)
from ascension_cli.api.data import (
    Written,
    demo,
    export,
    manifest,
    run_demo,
    run_export,
    run_manifest,
    run_shard,
    shard,
)
from ascension_cli.api.embedding import EmbedResult, embed, run_embed
from ascension_cli.api.evaluation import (
    Measurement,
    evaluate,
    measure,
    report,
    run_eval,
    run_report,
)
from ascension_cli.api.training import TrainSummary, run_training, train_supcon

__all__ = [
    "EmbedResult", "IndexResult", "Measurement", "TrainSummary", "Written", "calibrate",
    "demo", "embed", "run_calibrate",
    "evaluate", "export", "index", "manifest", "measure", "report", "run_demo", "run_embed",
    "run_eval", "run_export", "run_index", "run_manifest", "run_report", "run_search",
    "run_serve", "run_shard", "run_training", "search", "serve", "serve_app", "shard",
    "train_supcon", "history", "relabel", "remove", "replace", "snapshot", "run_history",
    "run_relabel", "run_remove", "run_replace", "run_snapshot", "rollback", "run_rollback",
    "run_upgrade", "upgrade",
]
