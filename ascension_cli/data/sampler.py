"""Class-balanced batches: each target batch holds ``target_batch / m`` classes x ``m`` images.

SupCon learns from positives; a random batch of 128 from a catalogue of thousands of classes holds
almost none. Fixing m images per class gives every anchor ``m * views - 1`` positives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ascension_cli.config.fields import classes_per_batch
from ascension_cli.errors import ConfigError, Wording


class ClassBalancedBatchSampler:
    """Yields micro-batches of ``(index, seed)`` keys; consecutive groups form target batches.

    ``target_batch // micro_batch`` consecutive micro-batches make one contrastive batch (under
    DDP, each of ``world_size`` ranks yields its ``1 / world_size`` share of them). With
    ``mix_micro_batches`` (for gradient caching) a target batch is shuffled before it is cut, so
    each micro-batch mixes classes: BatchNorm then normalises every micro-batch alike, and
    positives cannot be told apart by the micro-batch statistics they share. Without it (plain
    accumulation, where the loss sees one micro-batch) the batch stays laid out class by class,
    so each micro-batch holds whole classes and its anchors have positives.

    An epoch has ``len(labels) // target_batch`` target batches (at least one), drawn so that it
    covers the data about once: classes are picked in proportion to the images they have not yet
    shown, and a class smaller than ``m`` repeats its images (each repeat gets its own
    augmentation seed). With fewer classes than a batch needs, every class is used and takes a
    larger share.
    """

    def __init__(
        self,
        labels: np.ndarray,
        target_batch: int,
        micro_batch: int,
        samples_per_class: int,
        seed: int = 0,
        mix_micro_batches: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if target_batch % (micro_batch * world_size):
            raise ValueError(
                "target_batch must be a multiple of micro_batch x the number of processes"
            )
        self.rank = rank
        self.world_size = world_size
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.size == 0:
            raise ValueError("no samples to draw from")
        self.target_batch = target_batch
        self.micro_batch = micro_batch
        self.samples_per_class = samples_per_class
        self.seed = seed
        self.mix_micro_batches = mix_micro_batches
        self.epoch = 0
        self.skip = 0
        self.classes = np.unique(self.labels)
        self.members = {int(c): np.flatnonzero(self.labels == c) for c in self.classes}
        self.excluded: set[int] = set()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw ``epoch``'s batches; ``skip`` leaves out its first target batches (a resume
        mid-epoch), drawing exactly what the uninterrupted epoch would draw after them."""
        self.epoch = epoch
        self.skip = skip

    def exclude(self, indices) -> None:
        """Stop drawing these indices (files that failed to load) from the next epoch on."""
        self.excluded.update(int(i) for i in indices)

    @property
    def batches_per_epoch(self) -> int:
        return steps_per_epoch(len(self.labels), self.target_batch)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of this rank that make one target batch."""
        return self.target_batch // (self.micro_batch * self.world_size)

    def __len__(self) -> int:
        """This rank's micro-batches left in the epoch."""
        remaining = max(0, self.batches_per_epoch - self.skip)
        return remaining * self.micro_batches_per_step

    def target_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's target batches, as arrays of dataset indices (deterministic by seed)."""
        rng = np.random.default_rng([self.seed, epoch])
        pools: dict[int, np.ndarray] = {}
        for label, members in self.members.items():
            kept = np.array([i for i in members if int(i) not in self.excluded], dtype=np.int64)
            if kept.size:
                pools[label] = kept
        if not pools:
            raise ValueError("every sample has been excluded")
        labels = np.array(sorted(pools), dtype=np.int64)
        order = {label: rng.permutation(pools[label]) for label in labels}
        cursor = dict.fromkeys(labels.tolist(), 0)
        remaining = np.array([len(pools[label]) for label in labels], dtype=np.float64)

        per_batch = classes_per_batch(len(labels), self.target_batch, self.samples_per_class)
        base, extra = divmod(self.target_batch, per_batch)
        batches: list[np.ndarray] = []
        for _ in range(self.batches_per_epoch):
            # Unseen images weigh in; the small floor lets exhausted classes still be picked.
            weights = remaining + 1e-3
            chosen = rng.choice(
                len(labels), size=per_batch, replace=False, p=weights / weights.sum()
            )
            batch: list[int] = []
            for position, class_slot in enumerate(chosen):
                label = int(labels[class_slot])
                take = base + (1 if position < extra else 0)
                batch.extend(self._draw(order, cursor, label, take, rng))
                remaining[class_slot] = max(0.0, remaining[class_slot] - take)
            batches.append(np.asarray(batch, dtype=np.int64))
        return batches

    @staticmethod
    def _draw(order, cursor, label, count, rng) -> list[int]:
        drawn: list[int] = []
        while len(drawn) < count:
            pool = order[label]
            start = cursor[label]
            if start >= len(pool):
                order[label] = pool = rng.permutation(pool)
                start = 0
            piece = pool[start : start + count - len(drawn)]
            cursor[label] = start + len(piece)
            drawn.extend(int(i) for i in piece)
        return drawn

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        seeds = np.random.default_rng([self.seed, self.epoch, 1])
        shuffle = np.random.default_rng([self.seed, self.epoch, 2])
        for number, batch in enumerate(self.target_batches(self.epoch)):
            sample_seeds = seeds.integers(0, 2**31 - 1, size=len(batch))
            keys = list(zip(batch.tolist(), sample_seeds.tolist(), strict=True))
            if self.mix_micro_batches:
                keys = [keys[i] for i in shuffle.permutation(len(keys))]
            if number < self.skip:  # drawn above all the same, so later seeds do not move
                continue
            # Every rank draws the same global batch and takes its own contiguous share: no
            # image is seen by two ranks, and the global batch keeps m images per class.
            share = len(keys) // self.world_size
            keys = keys[self.rank * share : (self.rank + 1) * share]
            for start in range(0, len(keys), self.micro_batch):
                yield keys[start : start + self.micro_batch]


def steps_per_epoch(images: int, target_batch: int) -> int:
    """Optimizer steps an epoch over ``images`` training images takes (at least one): each
    step a target batch, the last partial one left out."""
    return max(1, images // target_batch)


def distinct_share(class_sizes: np.ndarray, target_batch: int, samples_per_class: int) -> float:
    """The share of a target batch that holds different images (the rest repeat), as the
    sampler above draws it: ``min(classes, target_batch // m)`` classes, each its share of the
    batch, a class smaller than its share repeating its images."""
    sizes = np.asarray(class_sizes, dtype=np.float64)
    per_batch = classes_per_batch(len(sizes), target_batch, samples_per_class)
    take = target_batch / per_batch
    distinct = per_batch * np.minimum(sizes, take).mean()
    return min(1.0, distinct / target_batch)


# Below this share of different images, a target batch is "mostly repeats".
MIN_DISTINCT_SHARE = 0.5


@dataclass(frozen=True)
class BatchPlan:
    """Batch options fitted to the data; ``notes`` say what was reduced and why."""

    target_batch: int
    micro_batch: int
    samples_per_class: int
    notes: tuple[str, ...] = ()


def fit_batches(
    class_sizes: np.ndarray,
    target_batch: int,
    micro_batch: int,
    samples_per_class: int,
    world_size: int = 1,
    min_samples_per_class: int = 1,
    given: frozenset[str] = frozenset(),
) -> BatchPlan:
    """Check the batch options against the training set before anything is allocated.

    A target batch larger than the training set, or a ``samples_per_class`` so large for the
    classes that most of a batch would be repeats, is no contrastive batch. A value the user
    chose (named in ``given``) is refused with ``ConfigError`` naming what would work; a default
    is reduced, with a note saying why.
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    total = int(sizes.sum())
    notes: list[str] = []
    if target_batch > total:
        unit = micro_batch * world_size
        fitted_micro = micro_batch if unit <= total else max(1, total // world_size)
        fitted = max(2, total // (fitted_micro * world_size) * fitted_micro * world_size)
        changed = [name for name, old, new in (("batch_size", micro_batch, fitted_micro),
                                               ("target_batch", target_batch, fitted))
                   if old != new]
        advice = " ".join(f"{{{name}}} {value}" for name, value in (
            ("batch_size", fitted_micro), ("target_batch", fitted)) if name in changed)
        why = (f"the training set holds {total} images, fewer than {{target_batch}} "
               f"{target_batch}: a step would show each image about {target_batch / total:.0f} "
               "times")
        options = ("batch_size", "target_batch")
        if given & set(changed):
            raise ConfigError(f"{why}; give {advice}", options=options)
        notes.append(Wording(f"{why}; using {advice}", options))
        target_batch, micro_batch = fitted, fitted_micro
    samples_per_class = min(samples_per_class, target_batch)
    if distinct_share(sizes, target_batch, samples_per_class) < MIN_DISTINCT_SHARE:
        fewer = [m for m in range(samples_per_class - 1, min_samples_per_class - 1, -1)
                 if distinct_share(sizes, target_batch, m) >= MIN_DISTINCT_SHARE]
        if fewer:  # repeats the option causes (small classes alone repeat by design)
            share = distinct_share(sizes, target_batch, samples_per_class)
            why = (f"with {{samples_per_class}} {samples_per_class}, only about {share:.0%} of "
                   f"each target batch would be different images (classes hold a median of "
                   f"{int(np.median(sizes))} training images)")
            options = ("samples_per_class",)
            if "samples_per_class" in given:
                raise ConfigError(f"{why}; give {{samples_per_class}} {fewer[0]} or less",
                                  options=options)
            notes.append(Wording(f"{why}; using {{samples_per_class}} {fewer[0]}", options))
            samples_per_class = fewer[0]
    return BatchPlan(target_batch, micro_batch, samples_per_class, tuple(notes))
