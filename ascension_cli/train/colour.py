"""``--augment auto``: whether colour tells the classes apart, measured before training.

Colour-agnostic augmentation is right when an item in another colour is the same item (a
garment), and wrong when colour is what the item is (a red and a green apple are two products).
The starting model answers which on the run's own photos: it searches the validation photos
(or, without them, a sample of the training photos) among themselves in colour and again with
every photo in grayscale. When grayscale loses more than ``COLOUR_GAP`` of Recall@1, colour
carries identity and the augmentation keeps it (``color-preserving``); else colour is destroyed
(``color-agnostic``), as by default. On the sets measured: Fashion-MNIST (grayscale photos)
loses nothing, sign-language hand photos nothing, grocery products 21 points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ascension_cli.data.augment import eval_transform
from ascension_cli.data.dataset import EvalDataset, collate
from ascension_cli.embedding.inference import extract_features
from ascension_cli.formats import DEFAULT_MAX_PIXELS
from ascension_cli.retrieval.evaluate import evaluate

COLOUR_GAP = 0.05  # Recall@1 that grayscale must lose for colour to count
SAMPLE = 1000  # photos searched, at most (seeded)


def recall_in_colour_and_gray(model, spec, paths: list[Path], labels: np.ndarray, machine,
                              batch_size: int, channels_last: bool,
                              max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[float, float]:
    """Recall@1 of the photos searched among themselves, in colour and all in grayscale
    (decoded as validation decodes them, within ``max_pixels``)."""
    found = []
    for recolouring in (None, "grayscale"):
        dataset = EvalDataset(paths, labels, eval_transform(spec.image_size, spec.mean,
                                                            spec.std, spec.crop_pct),
                              recolouring=recolouring, max_pixels=max_pixels,
                              min_side=2 * spec.image_size)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        features, found_labels, _ = extract_features(
            model, loader, machine.device, "backbone", machine.autocast,
            channels_last=channels_last)
        found.append(evaluate(features, found_labels, ks=(1,)).report.recall_at_k[1])
    return found[0], found[1]


def sample_photos(data, seed: int) -> tuple[list[Path], np.ndarray, str]:
    """Up to ``SAMPLE`` validation photos, else training photos (seeded), and which."""
    if data.val_paths:
        paths, labels, which = list(data.val_paths), np.asarray(data.val_labels), "validation"
    else:
        rows = data.train_index
        paths = [data.scan.paths[row] for row in rows]
        labels, which = data.scan.labels[rows], "training"
    if len(paths) > SAMPLE:
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), SAMPLE, replace=False))
        paths, labels = [paths[i] for i in keep], labels[keep]
    return paths, labels, which


def choose_augmentation(config, data, nets, machine) -> tuple[str, str]:
    """(the augmentation, a line saying why) for ``--augment auto``."""
    if not config.pretrained and config.weights is None:
        return "color-agnostic", ("--augment auto: color-agnostic (a model from scratch cannot "
                                  "tell whether colour tells the classes apart)")
    if data.shards is not None:
        return "color-agnostic", ("--augment auto: color-agnostic (shards are not searched "
                                  "before training; give --augment color-preserving where "
                                  "colour tells items apart)")
    paths, labels, which = sample_photos(data, config.seed)
    clean, gray = recall_in_colour_and_gray(nets.model, nets.spec, paths, labels, machine,
                                            config.batch_size, config.channels_last,
                                            config.max_image_pixels)
    chosen = "color-preserving" if clean - gray > COLOUR_GAP else "color-agnostic"
    because = ("colour tells these classes apart" if chosen == "color-preserving"
               else "colour does not tell these classes apart")
    return chosen, (f"--augment auto: {chosen}: on {len(paths)} {which} photos the starting "
                    f"model's Recall@1 is {clean:.3f} in colour, {gray:.3f} in grayscale, so "
                    f"{because}")
