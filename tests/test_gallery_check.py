"""--gallery-check: the validation photos searched among the training photos, as a catalogue of
them is searched, for the starting weights and best.pt, and said plainly where training did not
help that search."""

import json
import os
import signal

import numpy as np
import pytest

from ascension_cli import embed, evaluate
from ascension_cli.config import TrainConfig
from ascension_cli.errors import Interrupted
from ascension_cli.model.checkpoint import load_checkpoint
from ascension_cli.train.logbook import GALLERY_FIGURES, VALIDATION_FIGURES
from ascension_cli.train.loop import Trainer, train
from ascension_cli.train.validation import gallery_sample
from tests.conftest import make_dataset
from tests.test_cli import invoke

GALLERY_KEYS = [key for key, _ in GALLERY_FIGURES]


def options(data, save_dir, **overrides):
    values = dict(data_root=data, save_dir=save_dir, model="test_convnext", pretrained=False,
                  image_size=32, batch_size=4, target_batch=8, samples_per_class=2, epochs=2,
                  warmup_epochs=0, workers=0, seed=0)
    if "val_root" not in overrides:
        values["val_fraction"] = 0.25
    return TrainConfig(**(values | overrides))


def made_up_validation(monkeypatch, recalls):
    """Each validation's recall@1 from ``recalls`` (epoch 0 first): which epoch best.pt holds."""
    from ascension_cli.train import loop

    figures = iter(recalls)
    monkeypatch.setattr(loop, "validation_figures",
                        lambda run, stop: {"val_recall_at_1": next(figures)})


def metrics(save_dir):
    lines = (save_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_sample_spreads_over_the_classes_and_is_the_same_each_time():
    labels = np.repeat([0, 1, 2, 3], [10, 2, 5, 1])
    chosen = gallery_sample(labels, 9, seed=3)
    counts = np.bincount(labels[chosen], minlength=4)
    # Classes take turns: the two small classes give every photo, the others share the rest.
    assert len(chosen) == 9 and counts[1] == 2 and counts[3] == 1
    assert sorted(counts[[0, 2]]) == [3, 3]
    assert list(chosen) == sorted(set(chosen))
    assert list(gallery_sample(labels, 9, seed=3)) == list(chosen)
    assert any(list(gallery_sample(labels, 9, seed)) != list(chosen) for seed in range(4, 9))
    assert list(gallery_sample(labels, 18, seed=3)) == list(range(18))
    assert list(gallery_sample(labels, 100, seed=3)) == list(range(18))


@pytest.mark.parametrize("recalls", [[0.5, 0.6, 0.9], [0.5, 0.9, 0.6]],
                         ids=["best.pt is the last epoch", "best.pt is an earlier epoch"])
def test_best_pt_is_searched_among_the_training_photos_as_a_user_would(tmp_path, monkeypatch,
                                                                       recalls):
    """The figures recorded for best.pt are those of embedding the validation photos and the
    training photos with best.pt and evaluating one against the other (docs/training.md's
    recipe), whether best.pt is the model in memory at the end or an earlier epoch read back."""
    data = make_dataset(tmp_path / "data", per_class=6)
    val = make_dataset(tmp_path / "val", per_class=3, seed=1)
    made_up_validation(monkeypatch, recalls)
    train(options(data, tmp_path / "run", val_root=val))
    best = int(np.argmax(recalls))
    records = metrics(tmp_path / "run")
    measured = [r["epoch"] for r in records if r["gallery_recall_at_1"] is not None]
    assert measured == [0, best]

    report = evaluate(embed(tmp_path / "run" / "best.pt", val),
                      embed(tmp_path / "run" / "best.pt", data), ks=(1, 5)).clean.report
    expected = [report.recall_at_k[1], report.recall_at_k[5], report.map_at_r]
    assert [records[best][key] for key in GALLERY_KEYS] == pytest.approx(expected, abs=1e-6)
    # The run goes on from the model it trained, not from best.pt: last.pt is epoch 2's.
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


@pytest.mark.parametrize("recalls", [[0.1, 0.2, 0.3, 0.4], [0.1, 0.4, 0.2, 0.3]],
                         ids=["best.pt is the last epoch", "best.pt is an earlier epoch"])
def test_the_validation_photos_are_embedded_once_for_each_set_of_weights(tmp_path, monkeypatch,
                                                                         recalls):
    """The start's two searches share one embedding of the validation photos, and so does
    best.pt's search where best.pt is the model as trained; the figures are still best.pt's.
    Validation runs for real here; only its recall@1 is made up, to choose best.pt."""
    from ascension_cli.train import validation

    data = make_dataset(tmp_path / "data", per_class=6)
    val = make_dataset(tmp_path / "val", per_class=3, seed=1)
    embedded, made_up = [], iter(recalls)
    real_embedded, real_figures = validation._embedded, validation._figures

    def counted(run, loader, *args):
        embedded.append("val" if loader is run.loaders.val else "gallery")
        return real_embedded(run, loader, *args)

    def figures(names, *arrays):
        measured = real_figures(names, *arrays)
        return measured | ({"val_recall_at_1": next(made_up)} if names is VALIDATION_FIGURES
                           else {})

    monkeypatch.setattr(validation, "_embedded", counted)
    monkeypatch.setattr(validation, "_figures", figures)
    train(options(data, tmp_path / "run", val_root=val, epochs=3))
    best = int(np.argmax(recalls))
    # the start (validation, the training photos), each epoch's validation, best.pt's search
    assert embedded == ["val", "gallery", "val", "val", "val"] + (
        ["gallery"] if best == 3 else ["val", "gallery"])
    report = evaluate(embed(tmp_path / "run" / "best.pt", val),
                      embed(tmp_path / "run" / "best.pt", data), ks=(1, 5)).clean.report
    expected = [report.recall_at_k[1], report.recall_at_k[5], report.map_at_r]
    records = metrics(tmp_path / "run")
    assert [records[best][key] for key in GALLERY_KEYS] == pytest.approx(expected, abs=1e-6)


def test_the_run_says_plainly_where_training_did_not_help_that_search(dataset, tmp_path,
                                                                      monkeypatch):
    from ascension_cli.train import loop, validation

    made_up_validation(monkeypatch, [0.5, 0.6, 0.9])  # validation: every epoch better
    searched = iter([(0.9, 0.95, 0.3), (0.8, 0.96, 0.5)])  # the start, then best.pt
    for module in (loop, validation):
        monkeypatch.setattr(module, "gallery_figures", lambda run, stop, current=True: dict(
            zip(GALLERY_KEYS, next(searched), strict=True)))
    result = invoke("train", dataset, "--model", "test_convnext", "--no-pretrained",
                    "--image-size", "32", "--batch-size", "4", "--target-batch", "8",
                    "--samples-per-class", "2", "--epochs", "2", "--warmup-epochs", "0",
                    "--workers", "0", "--val-fraction", "0.25", "--save-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "the validation photos searched among the training photos, as a catalogue of them " \
           "is searched: recall@1 0.9000 -> 0.8000, recall@5 0.9500 -> 0.9600, MAP@R 0.3000 " \
           "-> 0.5000 (starting weights -> best.pt)" in said
    assert "note: in that search best.pt is below the starting weights in recall@1: for a " \
           "catalogue of these photos, training did not help there" in said
    assert "training did not beat the starting model" not in said  # validation says it did


def test_a_torchrun_summary_reads_best_pt_s_search_from_metrics_jsonl(tmp_path, monkeypatch):
    """The launcher's summary reads the run's files: metrics.jsonl holds best.pt's search
    among the training photos, measured after last.pt was written; a damaged file is not used."""
    from ascension_cli.train.state import metrics_history

    made_up_validation(monkeypatch, [0.5, 0.6, 0.9])
    train(options(make_dataset(tmp_path / "data"), tmp_path / "run"))
    history = metrics_history(tmp_path / "run")
    assert [r.epoch for r in history] == [0, 1, 2] and history[2].best
    assert history[0].gallery_recall_at_1 is not None
    assert history[2].gallery_recall_at_1 is not None
    assert load_checkpoint(tmp_path / "run" / "last.pt")["history"][2]["gallery_recall_at_1"] \
        is None
    for damaged in ('{"epoch": 0}', '{"epoch": "0", "step": 0}', "not json", "\udcff"):
        (tmp_path / "run" / "metrics.jsonl").write_text(damaged, errors="surrogateescape")
        assert metrics_history(tmp_path / "run") is None, damaged


def test_a_best_pt_gone_by_the_end_leaves_the_check_out_and_says_so(tmp_path, monkeypatch):
    from ascension_cli.train.reporter import Reporter

    class Said(Reporter):
        def __init__(self):
            self.said = []

        def message(self, text):
            self.said.append(str(text))

    made_up_validation(monkeypatch, [0.5, 0.9, 0.6])  # best.pt is epoch 1: read back at the end
    original = Trainer.end_epoch

    def removing(trainer, record):  # after the last epoch's checkpoints, best.pt is deleted
        original(trainer, record)
        if record.epoch == 2:
            (tmp_path / "run" / "best.pt").unlink()

    monkeypatch.setattr(Trainer, "end_epoch", removing)
    reporter = Said()
    result = train(options(make_dataset(tmp_path / "data"), tmp_path / "run"), reporter)
    assert result.history[1].gallery_recall_at_1 is None
    assert result.history[0].gallery_recall_at_1 is not None
    assert any(text.startswith("best.pt was not searched among the training photos: ")
               and "best.pt" in text.split(": ", 1)[1] for text in reporter.said)


def test_zero_skips_it(dataset, tmp_path):
    summary = train(options(dataset, tmp_path / "run", gallery_check=0))
    assert all(r.gallery_recall_at_1 is None for r in summary.history)
    assert all(r["gallery_map_at_r"] is None for r in metrics(tmp_path / "run"))


def test_a_signal_during_the_last_check_stops_with_both_checkpoints_complete(tmp_path,
                                                                             monkeypatch):
    from ascension_cli.train import validation

    data = make_dataset(tmp_path / "data")
    made_up_validation(monkeypatch, [0.5, 0.6, 0.9])
    original, calls = validation.extract_features, []

    def signalled(*args, **kwargs):  # embeddings 1-2: the start; 3-4: best.pt at the end
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(validation, "extract_features", signalled)
    with pytest.raises(Interrupted, match="in the check of best.pt against the training "
                       "photos; best.pt and last.pt are complete") as stopped:
        train(options(data, tmp_path / "run"))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2


@pytest.mark.parametrize("gallery_check, embedded_at_start", [(2000, []), (10, ["gallery"])],
                         ids=["every training photo", "a sample of them"])
def test_the_start_reuses_the_colour_tests_features(tmp_path, monkeypatch, start_weights,
                                                    gallery_check, embedded_at_start):
    """``--augment auto``'s colour test embeds every validation and training photo with the
    starting weights: the start's searches reuse those features (the gallery's only where the
    gallery check searches them all) and find what a run that embeds them afresh finds."""
    from ascension_cli.train import validation

    weights = start_weights[0]
    data = make_dataset(tmp_path / "data", per_class=8)
    embedded, real_embedded = [], validation._embedded

    def counted(run, loader, *args):
        embedded.append("val" if loader is run.loaders.val else "gallery")
        return real_embedded(run, loader, *args)

    monkeypatch.setattr(validation, "_embedded", counted)
    starts = {}
    for augment in ("auto", "color-agnostic"):
        embedded.clear()
        train(options(data, tmp_path / augment, model="test_efficientnet", pretrained=True,
                      weights=weights, augment=augment, epochs=1, precision="fp32",
                      gallery_check=gallery_check))
        starts[augment] = metrics(tmp_path / augment)[0]
        if augment == "auto":
            assert embedded[:-1] == embedded_at_start  # then epoch 1's validation
    keys = [key for key, _ in VALIDATION_FIGURES] + GALLERY_KEYS
    assert starts["auto"]["gallery_recall_at_1"] is not None
    assert [starts["auto"][key] for key in keys] == pytest.approx(
        [starts["color-agnostic"][key] for key in keys], abs=1e-6)
