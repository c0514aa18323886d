"""Retrieval quality on real photos: Ascension's defaults against frozen features and PML loops.

Each data set (a class-per-folder tree) is split once, by ``--split-seed``, into train / val /
test per class. Every system trains on train; queries are the test photos and the gallery is the
train photos, so the figures are on photos no system trained on. Val is for tuning (``--on val``
reports it instead of test); the test split is never used for a choice. Systems:

- ``frozen``: the pretrained backbone's pooled features, no training;
- ``plain``: the loop a user would write on pytorch-metric-learning (SupConLoss,
  MPerClassSampler m=4, AdamW 3e-4 wd 1e-4, batch 32 x 2 views, crop/flip/20 % grayscale, fp32,
  loss on the backbone features), the baseline every ratio is taken against;
- ``proxyanchor``: the same loop with PML's ProxyAnchorLoss (margin 0.1, alpha 32), random
  batches of 64 single views, the proxies trained by their own AdamW at 100 x the LR (3e-2),
  as its docs and paper say;
- ``multisim``: the same loop with PML's MultiSimilarityLoss (2, 50, 0.5) and its miner
  (epsilon 0.1), batches of 64 single views, 4 photos of each class;
- ``ascension``: ``TrainConfig`` defaults through the Python API (``train``), evaluated from
  ``best.pt`` (chosen on val) with the features ``ascension embed`` gives by default;
- ``--variant NAME:key=value,key=value``: Ascension with those ``TrainConfig`` options changed
  (and ``features=head`` to evaluate the projection head's output instead of the backbone's;
  ``epochs=N`` replaces ``--epochs`` for it, at both budgets, to compare at equal time a
  variant whose epoch costs less);
- ``--mix-start SHARE ...``: each Ascension run's ``best.pt`` also scored with its trunk's
  weights mixed with the starting ones (share s of the trained weights, 1 - s of the pretrained:
  a weight-space ensemble, as WiSE-FT does), a row ``ascension~s`` each, from the same training.

Reported per set and system: Recall@1/5, MAP@R, Recall@1 of hue-rotated (90 and 180 degrees) and
grayscale queries against the clean gallery, training wall time, and the ratios of Recall@1 and
time to ``plain``. With several ``--seeds`` (training seeds; the split stays fixed) each figure
is a mean, with its spread in the JSON. A second table puts the defaults (and each variant)
against every other system query by query: the difference in points and its 95 % bootstrap
interval over the queries (``_stats.py``), so a lead smaller than the split's luck shows as an
interval that spans zero.

``--budget`` says what the systems are compared at: ``epochs`` (each trains ``--epochs``),
``passes`` (each sees as many augmented images as ``plain`` does in ``--epochs``, two views of
each photo: a one-view system trains twice the epochs) or ``both`` (the default: a system whose
epochs are the same at both budgets is trained once). Each row says its epochs and training
seconds, so quality per second can be read off too.

    python benchmarks/bench_quality.py --quick   # ../shared/data's sets, 150 a class, 2 epochs
    python benchmarks/bench_quality.py --sets ../shared/data/* --max-per-class 150 --seeds 0 1
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, benchmark_parser, print_table, write_json
from _sets import suite
from _stats import base, below_start, beyond_noise, compare, interval

RECOLOURED = ("hue90", "hue180", "grayscale")
MIXED = "~"  # a mix's row: the system, MIXED, its share (ascension~0.75)
WEIGHTS = ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"


@dataclass
class Split:
    name: str
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def part(self, which: str) -> tuple[list[Path], np.ndarray]:
        index = getattr(self, which)
        return [self.paths[i] for i in index], self.labels[index]


def split_set(root: Path, seed: int, test_fraction: float, val_fraction: float,
              max_per_class: int | None) -> Split:
    """A fixed per-class split; ``max_per_class`` first keeps a seeded subset of each class."""
    from ascension_cli.data.folder import scan_folder

    scan = scan_folder(root)
    keep = []
    for label in range(len(scan.classes)):
        members = np.flatnonzero(scan.labels == label)
        members = members[np.random.default_rng([seed, label, 7]).permutation(len(members))]
        keep.append(members[:max_per_class] if max_per_class else members)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label, members in enumerate(keep):
        members = members[np.random.default_rng([seed, label]).permutation(len(members))]
        n_test = max(2, round(len(members) * test_fraction))
        n_val = max(2, round(len(members) * val_fraction))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    index = {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
    return Split(root.name, scan.classes, scan.paths, scan.labels, **index)


def link_tree(destination: Path, split: Split, which: str, classes=None,
              labels: np.ndarray | None = None) -> Path:
    """The part as a class-per-folder tree of symbolic links, the input ``train`` reads; only
    the ``classes`` given (labels), and each photo under ``labels`` (default: its own)."""
    paths, own = split.part(which)
    labels = own if labels is None else labels
    for number, (path, label) in enumerate(zip(paths, labels, strict=True)):
        if classes is not None and own[number] not in classes:
            continue
        folder = destination / split.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number:06d}{path.suffix}").symlink_to(path.resolve())
    return destination


def score(model, spec, kind: str, split: Split, on: str, batch_size: int) -> dict:
    """Queries (``on``: test or val) against the train photos as gallery, clean and recoloured."""
    from ascension_cli.embedding.pipeline import embed_images
    from ascension_cli.retrieval.evaluate import evaluate

    def vectors(which: str, recolor: str | None = None):
        paths, labels = split.part(which)
        features, found, _ = embed_images(model, spec, paths, labels, feature_kind=kind,
                                          batch_size=batch_size, workers=0, recolouring=recolor)
        return features, found

    gallery, gallery_labels = vectors("train")
    figures = {}
    for recolor in (None, *RECOLOURED):
        queries, query_labels = vectors(on, recolor)
        evaluation = evaluate(queries, query_labels, gallery, gallery_labels, ks=(1, 5))
        report, scores = evaluation.report, evaluation.scores
        if recolor is None:
            figures.update(recall_at_1=report.recall_at_k[1], recall_at_5=report.recall_at_k[5],
                           map_at_r=report.map_at_r, per_query={
                               "recall_at_1": scores.recall_at_k[1].tolist(),
                               "recall_at_5": scores.recall_at_k[5].tolist(),
                               "map_at_r": scores.map_at_r.round(6).tolist()})
        else:
            figures[f"recall_at_1_{recolor}"] = report.recall_at_k[1]
    return figures


def backbone_model(args):
    """The pretrained trunk as an ``EmbeddingModel`` (its head unused: backbone features)."""
    from ascension_cli.model.backbone import build_model

    return build_model(args.model, image_size=args.image_size, pretrained=args.weights is not None,
                       weights=args.weights)


def run_frozen(split: Split, args, seed: int) -> dict:
    model, spec = backbone_model(args)
    return {"train_seconds": 0.0, **score(model, spec, "backbone", split, args.on, 64)}


def _pml_setup(split: Split, args, seed: int, views: int):
    """The pretrained model, and the train photos with the augmentation a user would write
    (``views`` views of each)."""
    from PIL import Image
    from torchvision import transforms as T

    # PML's sampler draws from numpy's global generator: seed it too, so the baseline repeats.
    torch.manual_seed(seed)
    np.random.seed(seed)
    model, spec = backbone_model(args)
    augment = T.Compose([
        T.RandomResizedCrop(spec.image_size), T.RandomHorizontalFlip(), T.RandomGrayscale(0.2),
        T.ToTensor(), T.Normalize(spec.mean, spec.std),
    ])
    paths, labels = split.part("train")

    class Views(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with Image.open(paths[i]) as image:
                image = image.convert("RGB")
                return torch.stack([augment(image) for _ in range(views)]), int(labels[i])

    return model, spec, Views(), labels


def _pml_loop(model, loader, loss_fn, optimizers, epochs: int, miner=None) -> float:
    """The loop of PML's examples, on the backbone's features; its wall time."""
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for views, batch_labels in loader:
            embeddings = model.backbone(views.flatten(0, 1))
            batch_labels = batch_labels.repeat_interleave(views.shape[1])
            pairs = miner(embeddings, batch_labels) if miner is not None else None
            loss = loss_fn(embeddings, batch_labels, pairs)
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
    return time.perf_counter() - started


def _balanced_loader(data, labels: np.ndarray, batch: int):
    """PML's MPerClassSampler batches, 4 photos of each class; fewer classes (a tiny
    smoke-test set) make the batch smaller."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    batch = min(batch, 4 * len(np.unique(labels)))
    sampler = MPerClassSampler(labels, m=4, batch_size=batch,
                               length_before_new_iter=max(len(labels), batch))
    return torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True)


def run_plain(split: Split, args, seed: int) -> dict:
    """The baseline: a plain pytorch-metric-learning SupCon loop, as a user would write it."""
    from pytorch_metric_learning.losses import SupConLoss

    model, spec, data, labels = _pml_setup(split, args, seed, views=2)
    loader = _balanced_loader(data, labels, 32)  # 32 images of 8 classes
    optimizer = torch.optim.AdamW(model.backbone.parameters(), lr=3e-4, weight_decay=1e-4)
    seconds = _pml_loop(model, loader, SupConLoss(temperature=0.1), [optimizer], args.epochs)
    return {"train_seconds": seconds, **score(model, spec, "backbone", split, args.on, 64)}


def run_proxy_anchor(split: Split, args, seed: int) -> dict:
    """PML's ProxyAnchorLoss as its docs and paper say: random batches of 64 photos, one view
    each, a proxy per class trained by its own optimizer at 100 x the backbone's LR."""
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    model, spec, data, labels = _pml_setup(split, args, seed, views=1)
    loss_fn = ProxyAnchorLoss(len(split.classes), spec.num_features, margin=0.1, alpha=32)
    batch = min(64, len(labels))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    optimizers = [torch.optim.AdamW(model.backbone.parameters(), lr=3e-4, weight_decay=1e-4),
                  torch.optim.AdamW(loss_fn.parameters(), lr=3e-2)]
    seconds = _pml_loop(model, loader, loss_fn, optimizers, args.epochs)
    return {"train_seconds": seconds, **score(model, spec, "backbone", split, args.on, 64)}


def run_multi_similarity(split: Split, args, seed: int) -> dict:
    """PML's MultiSimilarityLoss with its miner (the paper's alpha 2, beta 50, base 0.5,
    epsilon 0.1) on class-balanced batches of 64 photos, 4 of each class, one view each."""
    from pytorch_metric_learning.losses import MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    model, spec, data, labels = _pml_setup(split, args, seed, views=1)
    loader = _balanced_loader(data, labels, 64)
    optimizer = torch.optim.AdamW(model.backbone.parameters(), lr=3e-4, weight_decay=1e-4)
    seconds = _pml_loop(model, loader, MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
                        [optimizer], args.epochs, miner=MultiSimilarityMiner(epsilon=0.1))
    return {"train_seconds": seconds, **score(model, spec, "backbone", split, args.on, 64)}


BASELINES = {"plain": run_plain, "proxyanchor": run_proxy_anchor,
             "multisim": run_multi_similarity}
VIEWS = {"plain": 2, "proxyanchor": 1, "multisim": 1}  # augmented views of a photo per epoch


def epochs_at(budget: str, system: str, options: dict | None, epochs: int) -> int:
    """The epochs ``system`` trains at ``budget``: ``epochs`` (a variant's own, where it gives
    them), or as many image passes as ``plain`` makes in that many (its views x photos x
    epochs)."""
    from ascension_cli.config import TrainConfig

    epochs = (options or {}).get("epochs", epochs)
    if budget == "epochs" or system == "frozen":
        return epochs
    views = VIEWS.get(system) or (options or {}).get("views",
                                                     TrainConfig.model_fields["views"].default)
    return max(1, round(epochs * VIEWS["plain"] / views))


def run_system(split: Split, args, system: str, options: dict | None, seed: int,
               epochs: int) -> dict:
    """One training run of ``system`` for ``epochs``, scored."""
    args = copy.copy(args)
    args.epochs = epochs
    if system == "frozen":
        return run_frozen(split, args, seed)
    if system in BASELINES:
        return BASELINES[system](split, args, seed)
    return run_ascension(split, args, seed, options or {})


def train_ascension(train_root: Path, val_root: Path, args, seed: int, save_dir: Path,
                    options: dict | None = None):
    """Ascension's defaults (with ``options`` changed) through the Python API, as the quality
    benchmarks run it: returns (the checkpoint chosen on val, training seconds, the result)."""
    from ascension_cli import train_supcon

    values = dict(data_root=train_root, val_root=val_root, model=args.model,
                  image_size=args.image_size, epochs=args.epochs, seed=seed, save_dir=save_dir,
                  **(options or {}))
    if args.weights is None:
        values["pretrained"] = False
    else:
        values["weights"] = args.weights
    started = time.perf_counter()
    result = train_supcon(**values)
    seconds = time.perf_counter() - started
    return result.best_checkpoint or result.last_checkpoint, seconds, result


def run_ascension(split: Split, args, seed: int, options: dict) -> dict:
    from ascension_cli.model.checkpoint import load_model
    from ascension_cli.train.logbook import GALLERY_FIGURES, VALIDATION_FIGURES

    options = dict(options)
    features = options.pop("features", "backbone")  # which vectors are evaluated
    options.pop("epochs", None)  # the run's, args.epochs, came from it (epochs_at)
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        checkpoint, seconds, result = train_ascension(
            link_tree(work / "train", split, "train"), link_tree(work / "val", split, "val"),
            args, seed, work / "run", options)
        model, spec, _ = load_model(checkpoint)
        figures = score(model, spec, features, split, args.on, 64)
        mixes = score_mixes(model, spec, features, split, args) if args.mix_start else {}
        history = result.history
        return {"train_seconds": seconds, "steps": history[-1].step,
                **{f"{key}_by_epoch": [getattr(r, key) for r in history]
                   for key, _ in VALIDATION_FIGURES + GALLERY_FIGURES},
                "epoch_seconds": [r.seconds for r in history],
                "images_per_second": [r.images_per_second for r in history],
                "data_wait_fraction": [r.data_wait_fraction for r in history], **figures,
                **({"mixes": mixes} if mixes else {})}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def score_mixes(model, spec, kind: str, split: Split, args) -> dict[str, dict]:
    """``model`` (best.pt's) scored with each ``--mix-start`` share s: every floating-point
    weight of its trunk s x the trained one + (1 - s) x the starting model's (the head stays as
    trained); {share: figures}. The model keeps the last mix."""
    start = backbone_model(args)[0].state_dict()
    trained = {key: value.detach().clone() for key, value in model.state_dict().items()}
    mixes = {}
    for share in args.mix_start:
        model.load_state_dict({
            key: (start[key].to(value.dtype).lerp(value, share)
                  if key.startswith("backbone.") and value.is_floating_point() else value)
            for key, value in trained.items()})
        mixes[f"{share:g}"] = score(model, spec, kind, split, args.on, 64)
    return mixes


def mix_rows(system: str, runs: list[dict]) -> dict[str, list[dict]]:
    """The mixes ``run_ascension`` scored, taken out of ``runs`` into rows of their own:
    {'ascension~0.5': [one run per seed], ...}, each with its training's seed, epochs and time."""
    rows: dict[str, list[dict]] = {}
    for run in runs:
        for share, figures in run.pop("mixes", {}).items():
            rows.setdefault(f"{system}{MIXED}{share}", []).append({
                key: run[key] for key in ("seed", "epochs", "train_seconds")} | figures)
    return rows


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, TrainConfig options); numbers (``1e-3`` too, which
    YAML reads as text) become numbers, other values are parsed as YAML."""
    from ascension_cli.config.train import option_value

    name, _, body = text.partition(":")
    options = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        options[key.strip().replace("-", "_")] = option_value(value.strip())
    return name, options


def summarise(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float | int)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    spread = {k: float(np.std([r[k] for r in runs])) for k in keys}
    return {"mean": mean, "std": spread, "runs": runs}


def training_parser(doc: str, script: str):
    """The options of every benchmark that trains on real sets: which sets, model, weights,
    size, epochs and split (with ``--quick`` and ``--json``)."""
    parser = benchmark_parser(doc, script, quick="2 epochs, 150 photos a class, ../shared/data's "
                              "sets only: minutes, not hours (docs/benchmarks.md has the times)")
    parser.add_argument("--sets", nargs="+", type=Path,
                        help="class-per-folder trees (default: the suite, every set under "
                        "../shared/data and those get_*.py built in benchmarks/cache; --quick: "
                        "../shared/data's only)")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", type=Path, default=WEIGHTS if WEIGHTS.is_file() else None,
                        help="timm weights file (default: ../shared/weights' lite0; 'none' "
                        "trains from scratch)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, help="default: 5 (--quick: 2)")
    parser.add_argument("--max-per-class", type=int,
                        help="keep this many photos of each class (default: all; --quick: 150)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    return parser


def training_args(parser) -> tuple[object, list[Path]]:
    """The parsed options, defaults filled in, and the sets they name."""
    args = parser.parse_args()
    if args.weights is not None and str(args.weights).lower() == "none":
        args.weights = None
    args.epochs = args.epochs or (2 if args.quick else 5)
    args.max_per_class = args.max_per_class or (150 if args.quick else None)
    sets = args.sets or suite(cached=not args.quick)  # --quick: a fixed size as the cache grows
    if not sets:
        where = "../shared/data (--quick reads only there)" if args.quick else (
            "../shared/data or benchmarks/cache (run benchmarks/get_grocery.py, get_trashnet.py, "
            "get_cards.py)")
        parser.error(f"no sets: none under {where}, and no --sets given")
    return args, sets


def settings_of(args, sets: list[Path]) -> dict:
    """The options as the JSON records them."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("json", "sets")} | {"sets": [str(s) for s in sets]}


BUDGETS = {"epochs": ["epochs"], "passes": ["passes"], "both": ["epochs", "passes"]}


def row_name(system: str, budget: str, chosen: str) -> str:
    """A result's name: the system's, marked when both budgets are reported."""
    return f"{system} @passes" if chosen == "both" and budget == "passes" else system


def measure(split: Split, args, system: str, options: dict | None) -> dict[str, dict]:
    """One system's rows on one set: its summary over the seeds at each budget asked (a
    budget that asks the epochs another did reuses that run)."""
    rows, done = {}, {}
    for budget in BUDGETS[args.budget]:
        epochs = epochs_at(budget, system, options, args.epochs)
        if epochs not in done:
            runs = [{"seed": seed, "epochs": epochs,
                     **run_system(split, args, system, options, seed, epochs)}
                    for seed in (args.seeds if system != "frozen" else args.seeds[:1])]
            done[epochs] = {name: summarise(named) for name, named in
                            {system: runs, **mix_rows(system, runs)}.items()}
            for name, summary in done[epochs].items():
                print(f"  {name}, {epochs} epochs: R@1 {summary['mean']['recall_at_1']:.4f} in "
                      f"{summary['mean']['train_seconds']:.0f} s", flush=True)
        for name, summary in done[epochs].items():
            rows[row_name(name, budget, args.budget)] = summary
    return rows


FIGURE_NAMES = {"recall_at_1": "R@1", "recall_at_5": "R@5", "map_at_r": "MAP@R"}


def print_below_start(paired: dict[str, dict]) -> None:
    """Issue 44's "never below the starting model": each figure in which the defaults retrieve
    worse than the frozen features at the same budget, or a line saying there is none."""
    lines = [f"  {name}, {row}: {FIGURE_NAMES[figure]} {interval(difference)}"
             + (" (beyond the queries' luck)" if difference["beyond_luck"] else "")
             for name, by in paired.items() for row, figures in below_start(by).items()
             for figure, difference in figures.items()]
    if any(base(theirs) == "frozen" for by in paired.values() for against in by.values()
           for theirs in against):
        print("below the starting model (the defaults minus the frozen features, points, 95 % "
              "interval):", *(lines or ["  nowhere"]), sep="\n")


def main() -> None:
    parser = training_parser(__doc__, __file__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--on", choices=("test", "val"), default="test",
                        help="queries: the test split (report) or the val split (tuning)")
    parser.add_argument("--systems", nargs="*", choices=["frozen", *BASELINES, "ascension"],
                        default=["frozen", "plain", "proxyanchor", "multisim", "ascension"],
                        help="which to run (none given: only the --variant ones)")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:key=value,... Ascension with these TrainConfig options")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="both",
                        help="compare at equal epochs, equal image passes, or both")
    parser.add_argument("--mix-start", type=float, nargs="+", default=[], metavar="SHARE",
                        help="also score each Ascension best.pt with its trunk mixed with the "
                        "starting weights: SHARE of the trained, 1 - SHARE of the pretrained "
                        "(rows ascension~SHARE)")
    args, sets = training_args(parser)
    if args.mix_start and args.weights is None:
        parser.error("--mix-start needs --weights: a run from scratch starts from random weights")
    if not all(0 <= share <= 1 for share in args.mix_start):
        parser.error("--mix-start: each share lies between 0 and 1")
    variants = dict(parse_variant(text) for text in args.variant)
    if taken := sorted(set(variants) & {"frozen", *BASELINES}):
        parser.error(f"--variant {taken[0]}: that name is a baseline's; name it otherwise")
    systems = {name: None for name in args.systems} | variants
    if not systems:
        parser.error("nothing to run: name --systems, or give a --variant")

    results: dict[str, dict] = {}
    for root in sets:
        split = split_set(root, args.split_seed, args.test_fraction, args.val_fraction,
                          args.max_per_class)
        results[split.name] = {}
        print(f"{split.name}: {len(split.classes)} classes, train {len(split.train)}, "
              f"val {len(split.val)}, test {len(split.test)}", flush=True)
        for system, options in systems.items():
            results[split.name].update(measure(split, args, system, options))
            # What is measured so far is kept: a crash or Ctrl-C an hour in loses one system.
            write_json("bench_quality", {"settings": settings_of(args, sets),
                                         "variants": variants, "results": results,
                                         "complete": False}, args.json)

    rows = []
    for name, by_system in results.items():
        plain = by_system.get("plain", {}).get("mean")
        for system, summary in by_system.items():
            m, s = summary["mean"], summary["std"]
            worst = min(m[f"recall_at_1_{kind}"] for kind in RECOLOURED)
            ratio = (f"{m['recall_at_1'] / plain['recall_at_1']:.3f}"
                     if plain and plain["recall_at_1"] else "-")
            time_ratio = (f"{m['train_seconds'] / plain['train_seconds']:.2f}"
                          if plain and plain["train_seconds"] and m["train_seconds"] else "-")
            spread = f" ±{s['recall_at_1']:.3f}" if len(summary["runs"]) > 1 else ""
            rows.append([name, system, f"{m['epochs']:.0f}", f"{m['recall_at_1']:.4f}{spread}",
                         f"{m['recall_at_5']:.4f}", f"{m['map_at_r']:.4f}",
                         f"{m['recall_at_1_hue180']:.4f}", f"{m['recall_at_1_grayscale']:.4f}",
                         f"{worst - m['recall_at_1']:+.4f}", f"{m['train_seconds']:.0f}",
                         ratio, time_ratio])
            summary["recolour_gap"] = worst - m["recall_at_1"]
    print_table(
        f"retrieval on the {args.on} split ({args.epochs} epochs, or as many image passes as "
        f"plain's, {args.model} at {args.image_size} px, seeds {args.seeds})",
        ["set", "system", "epochs", "R@1", "R@5", "MAP@R", "R@1 hue180", "R@1 gray", "recolour gap",
         "train s", "R@1 / plain", "time / plain"], rows,
    )
    # A mix is paired like a variant: against the defaults and every baseline.
    paired = {name: compare(by_system, set(variants) | {base(s) for s in by_system if MIXED in s})
              for name, by_system in results.items()}
    if pairs := [[name, ours, theirs, *(interval(by_figure[f]) for f in (
            "recall_at_1", "recall_at_5", "map_at_r"))]
            for name, by_ours in paired.items() for ours, against in by_ours.items()
            for theirs, by_figure in against.items()]:  # none without Ascension and another
        print_table(f"paired on the same {args.on} queries: Ascension minus each system, "
                    "points, 95 % interval over the queries",
                    ["set", "ours", "against", "R@1", "R@5", "MAP@R"], pairs)
    print_below_start(paired)
    # The defaults win a set when they beat every other system there in all three figures.
    compared = [by for by in results.values() if "ascension" in by and len(by) > 1]
    wins = [all(by[ours]["mean"][key] > summary["mean"][key]
                for ours in by if base(ours) == "ascension"
                for system, summary in by.items() if base(system) != "ascension"
                and system.endswith("@passes") == ours.endswith("@passes")
                for key in ("recall_at_1", "recall_at_5", "map_at_r")) for by in compared]
    write_json("bench_quality", {
        "settings": settings_of(args, sets),
        "variants": variants, "results": results,
        "defaults_win_everywhere": all(wins) if len(compared) == len(results) else None,
        "complete": True, "paired": paired,
        "defaults_win_beyond_noise": (all(beyond_noise(by) for by in paired.values())
                                      if len(compared) == len(results) else None),
        "below_starting_model": {name: below_start(by) for name, by in paired.items()},
    }, args.json)


if __name__ == "__main__":
    main()
