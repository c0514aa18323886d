from collections import Counter

import numpy as np
import pytest

from ascension_cli.config import option_name
from ascension_cli.data.sampler import ClassBalancedBatchSampler
from ascension_cli.errors import ConfigError


def labels_of(counts: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)])


def target_batches(sampler: ClassBalancedBatchSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    micro = list(sampler)
    per_target = sampler.target_batch // sampler.micro_batch
    return [
        [index for batch in micro[i : i + per_target] for index, _ in batch]
        for i in range(0, len(micro), per_target)
    ]


def test_each_target_batch_is_classes_times_m():
    labels = labels_of([20] * 40)
    sampler = ClassBalancedBatchSampler(labels, target_batch=128, micro_batch=16,
                                        samples_per_class=4, seed=0)
    batches = target_batches(sampler)
    assert len(batches) == 800 // 128
    for batch in batches:
        assert len(batch) == 128
        per_class = Counter(labels[batch].tolist())
        assert len(per_class) == 32
        assert set(per_class.values()) == {4}


def test_micro_batches_have_the_micro_size_and_length_matches():
    labels = labels_of([10] * 12)
    sampler = ClassBalancedBatchSampler(labels, 32, 8, 4, seed=1)
    micro = list(sampler)
    assert len(micro) == len(sampler) == (120 // 32) * 4
    assert all(len(batch) == 8 for batch in micro)


def test_epoch_covers_the_data_about_once():
    labels = labels_of([30, 25, 20, 35, 40, 15, 28, 31] * 4)
    sampler = ClassBalancedBatchSampler(labels, 64, 16, 4, seed=2)
    drawn = [i for batch in target_batches(sampler) for i in batch]
    distinct = len(set(drawn))
    # Balanced classes cannot cover a skewed dataset exactly; most images appear each epoch.
    assert distinct >= 0.7 * len(drawn)
    assert len(drawn) <= len(labels)


def test_classes_smaller_than_m_repeat_images():
    labels = labels_of([2, 2, 10, 10, 10, 10, 10, 10])
    sampler = ClassBalancedBatchSampler(labels, 16, 8, 4, seed=3)
    for batch in target_batches(sampler):
        counts = Counter(labels[batch].tolist())
        assert set(counts.values()) == {4}


def test_fewer_classes_than_a_batch_needs_uses_all_classes():
    labels = labels_of([50, 50, 50])
    sampler = ClassBalancedBatchSampler(labels, 32, 8, 4, seed=4)
    for batch in target_batches(sampler):
        counts = Counter(labels[batch].tolist())
        assert len(batch) == 32
        assert sorted(counts) == [0, 1, 2]
        assert max(counts.values()) - min(counts.values()) <= 1


def test_deterministic_by_seed_and_epoch():
    labels = labels_of([12] * 10)
    first = list(ClassBalancedBatchSampler(labels, 24, 8, 4, seed=5))
    second = list(ClassBalancedBatchSampler(labels, 24, 8, 4, seed=5))
    other_seed = list(ClassBalancedBatchSampler(labels, 24, 8, 4, seed=6))
    assert first == second
    assert first != other_seed
    sampler = ClassBalancedBatchSampler(labels, 24, 8, 4, seed=5)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_excluded_indices_are_never_drawn():
    labels = labels_of([8] * 6)
    sampler = ClassBalancedBatchSampler(labels, 16, 8, 4, seed=7)
    sampler.exclude([0, 1, 2, 9])
    for epoch in range(5):
        drawn = {i for batch in target_batches(sampler, epoch) for i in batch}
        assert not drawn & {0, 1, 2, 9}


def test_augmentation_seeds_differ_between_repeats():
    labels = labels_of([1, 1])
    sampler = ClassBalancedBatchSampler(labels, 8, 8, 4, seed=8)
    keys = [key for batch in sampler for key in batch]
    assert len({seed for _, seed in keys}) == len(keys)


def test_rejects_target_not_multiple_of_micro():
    with pytest.raises(ValueError):
        ClassBalancedBatchSampler(labels_of([4, 4]), 10, 4, 2)


def test_cached_mode_mixes_classes_across_micro_batches():
    labels = labels_of([20] * 8)
    mixed = ClassBalancedBatchSampler(labels, 32, 8, 4, seed=9)
    blocked = ClassBalancedBatchSampler(labels, 32, 8, 4, seed=9, mix_micro_batches=False)
    mixed_micro, blocked_micro = list(mixed), list(blocked)
    # Same target batches either way; only the cut into micro-batches differs.
    for start in range(0, len(mixed_micro), 4):
        mixed_keys = sorted(k for batch in mixed_micro[start : start + 4] for k in batch)
        blocked_keys = sorted(k for batch in blocked_micro[start : start + 4] for k in batch)
        assert mixed_keys == blocked_keys
    # Blocked: each micro-batch is exactly two whole classes, so its anchors have positives.
    for batch in blocked_micro:
        assert sorted(Counter(labels[[i for i, _ in batch]].tolist()).values()) == [4, 4]
    classes_per_micro = [len({labels[i] for i, _ in batch}) for batch in mixed_micro]
    assert sum(classes_per_micro) / len(classes_per_micro) > 3


@pytest.mark.parametrize("mix", [True, False])
def test_ranks_share_each_global_batch_without_overlap(mix):
    labels = labels_of([12] * 10)
    whole = ClassBalancedBatchSampler(labels, 32, 4, 4, seed=3, mix_micro_batches=mix)
    ranks = [ClassBalancedBatchSampler(labels, 32, 4, 4, seed=3, mix_micro_batches=mix,
                                       rank=r, world_size=2) for r in range(2)]
    for sampler in (whole, *ranks):
        sampler.set_epoch(2)
    whole_micro, rank_micro = list(whole), [list(s) for s in ranks]
    assert all(len(m) == len(whole_micro) // 2 for m in rank_micro)
    per_step = 32 // 4
    for step in range(len(whole_micro) // per_step):
        expected = [k for b in whole_micro[step * per_step : (step + 1) * per_step] for k in b]
        shares = [[k for b in micro[step * 4 : (step + 1) * 4] for k in b]
                  for micro in rank_micro]
        assert shares[0] + shares[1] == expected  # together: the one-process global batch
        assert not {i for i, _ in shares[0]} & {i for i, _ in shares[1]}
        assert set(Counter(labels[[i for i, _ in expected]].tolist()).values()) == {4}


def test_target_batch_must_split_over_ranks():
    with pytest.raises(ValueError, match="number of processes"):
        ClassBalancedBatchSampler(labels_of([4] * 4), 8, 4, 2, world_size=3)


@pytest.mark.parametrize(("sizes", "target", "m"), [
    ([10, 10, 10], 16, 4), ([3] * 40, 32, 8), ([3] * 40, 32, 2), ([50, 1, 1, 1], 16, 4),
    ([1] * 30, 16, 4), ([6] * 6, 16, 16),
])
def test_distinct_share_matches_what_the_sampler_draws(sizes, target, m):
    from ascension_cli.data.sampler import distinct_share

    labels = np.repeat(np.arange(len(sizes)), sizes)
    sampler = ClassBalancedBatchSampler(labels, target, target, m, seed=0)
    drawn = [len(set(batch.tolist())) / len(batch)
             for epoch in range(20) for batch in sampler.target_batches(epoch)]
    assert distinct_share(np.array(sizes), target, m) == pytest.approx(np.mean(drawn), abs=0.1)


def test_fit_batches_reduces_defaults_and_refuses_what_the_user_chose():
    from ascension_cli.data.sampler import BatchPlan, fit_batches

    sizes = np.array([10, 10, 10, 6])  # 36 training images
    fitted = fit_batches(sizes, 128, 16, 4)
    assert (fitted.target_batch, fitted.micro_batch, fitted.samples_per_class) == (32, 16, 4)
    # The library names options by field; the command line spells the same note as flags.
    assert "holds 36 images" in fitted.notes[0] and "using target_batch 32" in fitted.notes[0]
    assert "using --target-batch 32" in fitted.notes[0].render(option_name)
    with pytest.raises(ConfigError, match="give target_batch 32") as refused:
        fit_batches(sizes, 1024, 16, 4, given=frozenset({"target_batch"}))
    assert "give --target-batch 32" in refused.value.render(option_name)
    with pytest.raises(ConfigError, match="give batch_size 36 target_batch 36"):
        fit_batches(sizes, 10**9, 10**9, 4, given=frozenset({"target_batch", "batch_size"}))
    # Under DDP the micro-batch of every process counts.
    assert fit_batches(sizes, 128, 8, 4, world_size=2).target_batch == 32
    # Options that fit are left alone.
    assert fit_batches(sizes, 16, 4, 4) == fit_batches(sizes, 16, 4, 4, given=frozenset(
        {"target_batch", "batch_size", "samples_per_class"})) == BatchPlan(16, 4, 4, ())


def test_fit_batches_lowers_samples_per_class_that_would_make_mostly_repeats():
    from ascension_cli.data.sampler import fit_batches

    sizes = np.full(40, 3)  # many small classes: m = 32 would draw 3 images 32 times over
    fitted = fit_batches(sizes, 64, 16, 32)
    assert fitted.samples_per_class == 5 and "samples_per_class 5" in fitted.notes[0]
    assert "--samples-per-class 5" in fitted.notes[0].render(option_name)
    with pytest.raises(ConfigError, match="give samples_per_class 5 or less"):
        fit_batches(sizes, 64, 16, 32, given=frozenset({"samples_per_class"}))
    # One-image classes repeat by design; a lower m that cannot help is not asked for.
    assert fit_batches(np.array([50, 1, 1, 1]), 16, 4, 4).notes == ()
