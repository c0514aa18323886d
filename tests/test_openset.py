"""Open-set measures against brute-force numpy: FMR, FNMR, the accepted known queries' Recall@1,
the ROC AUC, and the threshold for a target FMR."""

import numpy as np
import pytest

from ascension_cli.retrieval.openset import (
    calibrated_threshold,
    open_set_curve,
    rates_at,
    roc_auc,
    threshold_for_fmr,
)


def scores(seed: int, n_known: int = 60, n_unknown: int = 40):
    rng = np.random.default_rng(seed)
    known = np.round(rng.normal(0.7, 0.15, n_known), 2)  # rounded: ties on purpose
    unknown = np.round(rng.normal(0.45, 0.15, n_unknown), 2)
    correct = rng.random(n_known) < 0.8
    return known, correct, unknown


@pytest.mark.parametrize("seed", range(5))
def test_the_curve_is_the_brute_force_count_at_every_threshold(seed):
    known, correct, unknown = scores(seed)
    curve = open_set_curve(known, correct, unknown)
    for t, fmr, fnmr, recall in zip(curve.thresholds, curve.fmr, curve.fnmr,
                                    curve.recall_at_1_accepted, strict=True):
        accepted = known >= t
        assert rates_at(known, correct, unknown, t) == pytest.approx((fmr, fnmr, recall),
                                                                     nan_ok=True)
        assert fmr == pytest.approx(np.mean(unknown >= t))
        assert fnmr == pytest.approx(np.mean(~accepted))
        if accepted.any():
            assert recall == pytest.approx(np.mean(correct[accepted]))
        else:
            assert np.isnan(recall)
    assert curve.fmr[-1] == 0 and curve.fnmr[-1] == 1  # above every score: nothing passes
    assert curve.fmr[0] == 1 or curve.fnmr[0] == 0  # at the lowest score: everything passes


@pytest.mark.parametrize("seed", range(5))
def test_auc_is_the_pairwise_probability(seed):
    known, _, unknown = scores(seed)
    pairs = known[:, None] - unknown[None, :]
    expected = np.mean(pairs > 0) + 0.5 * np.mean(pairs == 0)
    assert roc_auc(known, unknown) == pytest.approx(expected)
    assert roc_auc(known + 10, unknown) == 1.0 and roc_auc(known - 10, unknown) == 0.0


@pytest.mark.parametrize(("seed", "target"), [(0, 0.0), (1, 0.01), (2, 0.05), (3, 0.1),
                                              (4, 0.5), (5, 1.0)])
def test_the_threshold_for_a_target_fmr_is_the_lowest_that_meets_it(seed, target):
    _, _, unknown = scores(seed, n_unknown=200)
    t = threshold_for_fmr(unknown, target)
    assert np.mean(unknown >= t) <= target + 1e-12
    # As low as it can be: the highest refused score sits just below it, and accepting it too
    # would break the target.
    if t > -1.0:
        refused = unknown[unknown < t].max()
        assert np.mean(unknown >= refused) > target
        assert t - refused <= 1e-4 + 1e-12


@pytest.mark.parametrize(("count", "target"), [(60, 0.01), (124, 0.01), (200, 0.05),
                                               (40, 0.1)])
def test_a_calibrated_threshold_passes_new_unknowns_at_the_target_rate(count, target):
    """Over many calibration draws from one distribution, the share of new unknowns that pass
    (known exactly: the uniform distribution's share above the threshold) is on average the
    target, as near as ranks allow, and never more than the target of the calibration photos
    themselves pass. The lowest threshold on the calibration photos passes new ones at
    (floor(target n) + 1) / (n + 1), up to twice the target.
    """

    def tail(t: float) -> float:  # the share of uniform(-1, 0.5) scores above t
        return min(1.0, max(0.0, (0.5 - t) / 1.5))

    rng = np.random.default_rng(count)
    calibrated, lowest = [], []
    for _ in range(4000):
        unknown = rng.uniform(-1, 0.5, count)
        t = calibrated_threshold(unknown, target)
        assert np.mean(unknown >= t) <= target + 1e-12
        calibrated.append(tail(t))
        lowest.append(tail(threshold_for_fmr(unknown, target)))
    expected = max(1, round(target * (count + 1))) / (count + 1)  # the rank it refuses at
    assert np.mean(calibrated) == pytest.approx(expected, rel=0.05)
    assert abs(expected - target) <= 0.5 / (count + 1) + 1e-12  # as near the target as ranks go
    lowest_rank = np.floor(target * count + 1e-9) + 1
    assert np.mean(lowest) == pytest.approx(lowest_rank / (count + 1), rel=0.05)


def test_no_unknown_queries_is_a_clear_error():
    with pytest.raises(ValueError, match="no unknown queries"):
        threshold_for_fmr([], 0.01)


def clustered(seed: int = 0, classes: int = 8, per_class: int = 12, dim: int = 16):
    from ascension_cli.embedding.vectors import Vectors

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    vectors = centres[labels] + 0.9 * rng.normal(size=(len(labels), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return Vectors(vectors.astype(np.float32), labels, [f"{i}.png" for i in range(len(labels))],
                   [f"c{c}" for c in range(classes)], image_root="/data")


def test_eval_holds_out_classes_and_matches_a_brute_force_open_set(tmp_path):
    import json

    from typer.testing import CliRunner

    from ascension_cli.cli.app import app
    from ascension_cli.embedding.vectors import save_vectors
    from ascension_cli.retrieval.openset import held_out_classes

    data = clustered()
    save_vectors(tmp_path / "v.npz", data)
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "v.npz"), "--unknown-classes",
                                      "0.25", "--target-fmr", "0.05", "--json",
                                      str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "open set: 2 class(es) held out" in result.output
    report = json.loads((tmp_path / "m.json").read_text())["open_set"]

    # Brute force: held-out classes leave the searched set; each query's best other photo.
    unknown = held_out_classes(data.labels, 0.25, 0)
    assert report["unknown_classes"] == [f"c{c}" for c in unknown]
    similarity = data.vectors @ data.vectors.T
    np.fill_diagonal(similarity, -np.inf)
    similarity[:, np.isin(data.labels, unknown)] = -np.inf
    best = similarity.argmax(axis=1)
    top = similarity.max(axis=1)
    is_unknown = np.isin(data.labels, unknown)
    t = report["threshold"]
    assert report["fmr"] <= 0.05

    def share(scores, at):  # FAISS and numpy differ in the last float32 bits: bound it
        return np.mean(scores >= at + 1e-5), np.mean(scores >= at - 1e-5)

    low, high = share(top[is_unknown], t)
    assert low - 1e-9 <= report["fmr"] <= high + 1e-9
    low, high = share(top[~is_unknown], t)
    assert 1 - high - 1e-9 <= report["fnmr"] <= 1 - low + 1e-9
    if not np.any(np.abs(top[~is_unknown] - t) < 1e-5):
        accepted = ~is_unknown & (top >= t)
        assert report["recall_at_1_accepted"] == pytest.approx(
            np.mean(data.labels[best[accepted]] == data.labels[accepted]))
    pairs = top[~is_unknown][:, None] - top[is_unknown][None, :]
    assert report["auc"] == pytest.approx(np.mean(pairs > 0) + 0.5 * np.mean(pairs == 0),
                                          abs=1e-6)
