"""`--augment auto`: colour is kept when it tells the classes apart, measured before training
(the starting model searches the photos in colour and in grayscale), and a resume keeps the
choice."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml

from ascension_cli.data.folder import scan_folder
from ascension_cli.model.backbone import build_model
from ascension_cli.train.colour import choose_augmentation, recall_in_colour_and_gray
from ascension_cli.train.loop import train
from tests.test_train import Collect, config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
MACHINE = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)


def colour_classes(root, per_class: int = 10):
    """The same disc on the same grey, in three colours: only colour tells the classes apart
    (red and green are near in gray level)."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            image = np.full((40, 40, 3), 128, np.uint8)
            cv2.circle(image, tuple(int(v) for v in rng.integers(15, 25, 2)),
                       int(rng.integers(8, 13)), rgb, -1)
            cv2.imwrite(str(root / name / f"{index}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root


def searched(root, among=None):
    torch.manual_seed(0)
    model, spec = build_model("test_convnext", image_size=32, pretrained=False)
    scan = scan_folder(root)
    photos = (scan.paths, scan.labels)
    if among is None:
        return recall_in_colour_and_gray(model.eval(), spec, photos, None, MACHINE, 16,
                                         True)[:2]
    gallery = scan_folder(among)
    return recall_in_colour_and_gray(model.eval(), spec, photos,
                                     (gallery.paths, gallery.labels), MACHINE, 16, True)[:2]


def test_grayscale_loses_the_classes_only_colour_tells_apart(tmp_path, dataset):
    clean, gray = searched(colour_classes(tmp_path / "colours"))
    assert clean - gray > 0.2  # colour was the class
    clean, gray = searched(dataset)  # shapes in random colours: the shape is the class
    assert clean - gray < 0.1


def test_queries_searched_among_a_gallery(tmp_path):
    """Validation photos are searched among training photos (more photos, less luck): colour
    is found where only colour tells the classes apart."""
    queries = colour_classes(tmp_path / "queries", per_class=4)
    clean, gray = searched(queries, among=colour_classes(tmp_path / "gallery", per_class=12))
    assert clean - gray > 0.2


def test_the_choice_and_its_reason(tmp_path, dataset):
    torch.manual_seed(0)
    model, spec = build_model("test_convnext", image_size=32, pretrained=False)
    nets = SimpleNamespace(model=model.eval(), spec=spec)
    colours = colour_classes(tmp_path / "colours")
    options = SimpleNamespace(pretrained=True, weights=None, seed=0, batch_size=16,
                              channels_last=True, max_image_pixels=10_000_000)
    for root, expected in ((colours, "color-preserving"), (dataset, "color-agnostic")):
        scan = scan_folder(root)
        val = np.arange(len(scan.paths)) % 3 == 0
        data = SimpleNamespace(scan=scan, train_index=np.flatnonzero(~val), shards=None,
                               val_paths=[p for p, v in zip(scan.paths, val, strict=True) if v],
                               val_labels=scan.labels[val])
        chosen, why = choose_augmentation(options, data, nets, MACHINE)
        assert chosen == expected
        assert why.startswith(f"--augment auto: {expected}: with {val.sum()} validation photos "
                              f"searched among {(~val).sum()} training photos")
        assert "in colour" in why and "in grayscale" in why
        data.val_paths = []  # no validation split: training photos among themselves
        chosen, why = choose_augmentation(options, data, nets, MACHINE)
        assert chosen == expected
        assert f"with {(~val).sum()} training photos searched among themselves" in why
    chosen, why = choose_augmentation(SimpleNamespace(pretrained=False, weights=None), None,
                                      nets, MACHINE)
    assert chosen == "color-agnostic" and "from scratch" in why


def test_a_run_records_its_choice_and_a_resume_keeps_it(tmp_path, monkeypatch):
    from ascension_cli.train import colour

    data = colour_classes(tmp_path / "colours", per_class=8)
    picks = iter(["color-preserving", "color-agnostic"])  # a second measurement would differ
    monkeypatch.setattr(colour, "choose_augmentation",
                        lambda *a: (next(picks), "--augment auto: measured"))
    reporter = Collect()
    options = dict(augment="auto", epochs=2, samples_per_class=2)
    first = train(config(data, tmp_path / "run", **options), reporter,
                  stop_after_epoch=lambda epoch: epoch == 1)
    assert first.stopped_early and "--augment auto: measured" in reporter.messages
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["augment"] == "auto" and saved["resolved_augment"] == "color-preserving"
    train(config(data, tmp_path / "run", resume="auto", **options))
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["plan"]["augmentation"] == "color-preserving"
    assert checkpoint["plan"]["reasons"]["augmentation"] == (
        "--augment auto: chosen when the run started")
    assert next(picks) == "color-agnostic"  # the resume did not measure again


def test_a_checkpoint_from_before_the_plan_held_the_choice_resumes_with_it(tmp_path,
                                                                           monkeypatch):
    from ascension_cli.train import colour

    data = colour_classes(tmp_path / "colours", per_class=8)
    monkeypatch.setattr(colour, "choose_augmentation",
                        lambda *a: ("color-agnostic", "--augment auto: measured"))
    options = dict(augment="auto", epochs=2, samples_per_class=2)
    train(config(data, tmp_path / "run", **options), stop_after_epoch=lambda epoch: epoch == 1)
    path = tmp_path / "run" / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    # As an older run saved it: the choice in its own entry, a plan without the setup.
    for name in ("augmentation", "image_size", "workers"):
        del checkpoint["plan"][name]
    torch.save({**checkpoint, "augmentation": {"chosen": "color-preserving"}}, path)
    monkeypatch.setattr(colour, "choose_augmentation", lambda *a: pytest.fail("measured"))
    train(config(data, tmp_path / "run", resume="auto", **options))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["resolved_augment"] == "color-preserving"


@pytest.mark.parametrize("augment", ["color-preserving", "auto"])
def test_the_new_choices_train(tmp_path, dataset, augment):
    result = train(config(dataset, tmp_path / "run", augment=augment, epochs=1))
    assert result.history[-1].loss > 0
