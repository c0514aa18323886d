"""`--class-pairs`: look-alike classes from the class means, the sampler drawing a batch's classes
in look-alike pairs (and drawing exactly as before when a batch holds every class), a run that
records its pairs and a resume that keeps them."""

from __future__ import annotations

import numpy as np
import torch

from ascension_cli.data.sampler import ClassBalancedBatchSampler
from ascension_cli.train.lookalikes import lookalikes_of, sample_per_class
from ascension_cli.train.loop import train
from tests.test_train import Collect, config


def test_lookalikes_are_the_other_classes_by_nearest_mean():
    # Class means on a circle at 0, 10, 100 and 220 degrees: 0 and 1 are each other's nearest.
    angles = np.radians([0, 10, 100, 220])
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    features = np.stack([np.cos(angles[labels]), np.sin(angles[labels])], axis=1)
    features = features + rng.normal(0, 0.01, features.shape)
    found = lookalikes_of(features, labels)
    assert found == {0: [1, 2, 3], 1: [0, 2, 3], 2: [1, 0, 3], 3: [2, 0, 1]}
    assert lookalikes_of(features, labels, kept=1)[3] == [2]


def test_a_sample_holds_at_most_so_many_of_each_class_the_same_each_time():
    labels = np.array([0] * 12 + [1] * 3 + [2] * 9)
    chosen = sample_per_class(labels, seed=4, per_class=5)
    assert np.bincount(labels[chosen]).tolist() == [5, 3, 5]
    assert np.array_equal(chosen, sample_per_class(labels, seed=4, per_class=5))
    assert not np.array_equal(chosen, sample_per_class(labels, seed=5, per_class=5))


def sampler(classes: int, target_batch: int = 8, pairs=None) -> ClassBalancedBatchSampler:
    drawn = ClassBalancedBatchSampler(np.repeat(np.arange(classes), 6), target_batch, 2, 2,
                                      seed=3)
    drawn.lookalikes = pairs
    return drawn


def test_a_batch_holds_each_drawn_class_with_its_lookalike():
    partner = {c: c ^ 1 for c in range(8)}  # 0-1, 2-3, 4-5, 6-7
    drawn = sampler(8, pairs={c: [partner[c], (c + 2) % 8] for c in range(8)})
    labels = drawn.labels
    for epoch in range(3):
        for batch in drawn.target_batches(epoch):
            present = set(labels[batch].tolist())
            assert len(present) == 4 and np.bincount(labels[batch]).max() == 2
            assert all(partner[c] in present for c in present), present
    # Alone, the same sampler mixes classes of different pairs in most batches.
    alone = sampler(8)
    mixed = [any(partner[c] not in set(labels[b].tolist()) for c in labels[b])
             for b in alone.target_batches(0)]
    assert sum(mixed) >= len(mixed) // 2


def test_pairs_draw_a_partner_further_down_when_the_nearest_is_in_the_batch():
    drawn = sampler(6, target_batch=6, pairs={c: [0, 1, 2, 3, 4, 5] for c in range(6)})
    for batch in drawn.target_batches(0):
        assert len(set(drawn.labels[batch].tolist())) == 3  # 3 classes, none twice


def test_a_batch_holding_every_class_draws_exactly_as_without_pairs():
    pairs = {c: [(c + 1) % 3] for c in range(3)}
    with_pairs, alone = sampler(3, pairs=pairs), sampler(3)
    for epoch in range(2):
        for a, b in zip(with_pairs.target_batches(epoch), alone.target_batches(epoch),
                        strict=True):
            assert np.array_equal(a, b)


def test_a_run_records_its_pairs_and_a_resume_keeps_them(tmp_path, dataset, monkeypatch):
    from ascension_cli.train import lookalikes

    measured = {0: [1, 2, 3], 1: [0, 2, 3], 2: [3, 0, 1], 3: [2, 0, 1]}
    calls = []

    def measure(*_):
        calls.append(1)
        return measured, "--class-pairs: measured"

    monkeypatch.setattr(lookalikes, "measure_lookalikes", measure)
    options = dict(class_pairs=True, epochs=2, target_batch=4, batch_size=4)  # 2 classes a step
    train(config(dataset, tmp_path / "whole", **options))
    reporter = Collect()
    first = train(config(dataset, tmp_path / "parts", **options), reporter,
                  stop_after_epoch=lambda epoch: epoch == 1)
    assert first.stopped_early and "--class-pairs: measured" in reporter.messages
    train(config(dataset, tmp_path / "parts", resume="auto", **options))
    assert len(calls) == 2  # the two fresh runs measured; the resume read the checkpoint

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    assert whole["lookalikes"] == {"pairs": [[c, *others] for c, others in measured.items()]}
    assert parts["lookalikes"] == whole["lookalikes"]
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name


def test_pairs_are_off_from_scratch_and_when_a_batch_holds_every_class(tmp_path, dataset):
    reporter = Collect()
    train(config(dataset, tmp_path / "scratch", class_pairs=True, epochs=1, target_batch=4,
                 batch_size=4), reporter)
    assert any("--class-pairs: off (a model from scratch" in m for m in reporter.messages)
    reporter = Collect()
    train(config(dataset, tmp_path / "all", class_pairs=True, epochs=1), reporter)  # 4 a step
    assert not any("--class-pairs" in m for m in reporter.messages)
    for run in ("scratch", "all"):
        assert "lookalikes" not in torch.load(tmp_path / run / "last.pt", weights_only=True)
