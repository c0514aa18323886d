"""``--class-pairs``: which classes look alike, measured before training.

A target batch of 128 with 4 photos a class holds 32 classes. In a catalogue of 81 products two
look-alike varieties then share a batch in about one step of six, and SupCon pushes two classes
apart only in the steps where they meet. The starting model says which classes look alike: the
mean of each class's embedded training photos (a seeded sample of each) against every other
class's, by cosine. The sampler then draws a batch's classes in pairs, each with the class most
like it (``ClassBalancedBatchSampler._pairs``). When a batch holds every class there is nothing
to pair and nothing is measured.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader

from ascension_cli.data.augment import eval_transform
from ascension_cli.data.dataset import EvalDataset, collate
from ascension_cli.embedding.inference import extract_features

PER_CLASS = 8  # training photos a class, at most, embedded to find its look-alikes
KEPT = 8  # look-alikes kept for each class, most alike first


def sample_per_class(labels: np.ndarray, seed: int, per_class: int = PER_CLASS) -> np.ndarray:
    """Positions of up to ``per_class`` of each label's entries (seeded), in order."""
    rng = np.random.default_rng([seed, 7])
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:per_class]
              for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def lookalikes_of(features: np.ndarray, labels: np.ndarray,
                  kept: int = KEPT) -> dict[int, list[int]]:
    """label -> the ``kept`` other labels whose mean feature is nearest its own (cosine), most
    alike first, from the rows of ``features`` (N, D) and their ``labels`` (N,)."""
    classes = np.unique(labels)
    means = np.stack([features[labels == label].mean(axis=0) for label in classes])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    similarity = means @ means.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :min(kept, len(classes) - 1)]
    return {int(label): [int(classes[j]) for j in row]
            for label, row in zip(classes, order, strict=True)}


def measure_lookalikes(config, data, nets, machine) -> tuple[dict[int, list[int]] | None, str]:
    """(each class's look-alikes by the starting model, a line saying what was measured);
    None for a model from scratch, which cannot tell."""
    if not config.pretrained and config.weights is None:
        return None, ("--class-pairs: off (a model from scratch cannot tell which classes look "
                      "alike)")
    rows = data.train_index[sample_per_class(data.train_labels, config.seed)]
    paths, labels = [data.scan.paths[row] for row in rows], data.scan.labels[rows]
    spec = nets.spec
    dataset = EvalDataset(paths, labels, eval_transform(spec.image_size, spec.mean, spec.std,
                                                        spec.crop_pct),
                          max_pixels=config.max_image_pixels, min_side=2 * spec.image_size)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, collate_fn=collate)
    features, found, _ = extract_features(nets.model, loader, machine.device, "backbone",
                                          machine.autocast, channels_last=config.channels_last)
    pairs = lookalikes_of(np.asarray(features, dtype=np.float32), np.asarray(found))
    return pairs, (f"--class-pairs: the look-alikes of {len(pairs)} classes, from "
                   f"{len(found)} training photos through the starting model")
