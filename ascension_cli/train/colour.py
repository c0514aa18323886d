"""``--augment auto``: whether colour tells the classes apart, measured before training.

Colour-agnostic augmentation is right when an item in another colour is the same item (a
garment), and wrong when colour is what the item is (a red and a green apple are two products).
The starting model answers which on the run's own photos: it searches the validation photos
among the training photos (or, without a validation split, a sample of the training photos among
themselves) with every photo in colour, and again with every photo in grayscale. When grayscale
loses more than ``COLOUR_GAP`` of Recall@1, colour carries identity and the augmentation keeps it
(``color-preserving``); else colour is destroyed (``color-agnostic``), as by default. Searching
among the training photos, as a catalogue is searched, gives each query many more photos to
find than the validation photos alone: on TrashNet, the validation photos among themselves lost
-1.7 to +8.9 points in grayscale as their number changed, where among the training photos they
lose 5.1 to 8.3 (docs/benchmarks.md, round nineteen).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ascension_cli.data.dataset import collate, eval_photos
from ascension_cli.embedding.inference import extract_features
from ascension_cli.formats import DEFAULT_MAX_PIXELS
from ascension_cli.retrieval.evaluate import evaluate

# Recall@1 that grayscale must lose for colour to count: between the sets where colour does not
# tell the classes apart (playing cards +1.2 points, hand signs -3.3, Fashion-MNIST 0) and those
# where it does (TrashNet +5.1 to +8.3, grocery products +16.4), measured as below.
COLOUR_GAP = 0.03
SAMPLE = 1000  # photos searched, at most (seeded)
GALLERY = 2000  # training photos they are searched among, at most (seeded)


def _features(model, spec, paths: list[Path], labels: np.ndarray, recolouring: str | None,
              machine, batch_size: int, channels_last: bool, max_pixels: int):
    """The photos' backbone features, decoded as validation decodes them (within
    ``max_pixels``), recoloured or not."""
    dataset = eval_photos(spec, paths, labels, recolouring=recolouring, max_pixels=max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    features, found_labels, _ = extract_features(model, loader, machine.device, "backbone",
                                                 machine.autocast, channels_last=channels_last)
    return features, found_labels


def recall_in_colour_and_gray(model, spec, queries: tuple[list[Path], np.ndarray],
                              gallery: tuple[list[Path], np.ndarray] | None, machine,
                              batch_size: int, channels_last: bool,
                              max_pixels: int = DEFAULT_MAX_PIXELS
                              ) -> tuple[float, float, list[np.ndarray]]:
    """Recall@1 of the query photos searched among the gallery photos (among themselves
    without a gallery), all in colour, then all in grayscale; and the colour search's
    arrays: the queries' features and labels, then the gallery's (readable photos only)."""
    found, by_recolouring = [], {}
    for recolouring in (None, "grayscale"):
        # queries' features and labels, then the gallery's: evaluate's arguments in order
        arrays = [array for photos in (queries, gallery) if photos is not None
                  for array in _features(model, spec, *photos, recolouring, machine,
                                         batch_size, channels_last, max_pixels)]
        found.append(evaluate(*arrays, ks=(1,)).report.recall_at_k[1])
        by_recolouring[recolouring] = arrays
    return found[0], found[1], by_recolouring[None]


def _whole_split(data, queries, gallery, arrays: list[np.ndarray]):
    """((validation features, labels), (training features, labels)) of the colour search, when
    it embedded every validation and every training photo, each readable, in the split's
    order: the start's gallery check searches those very photos with these very weights, so it
    reuses them instead of embedding them again; else None."""
    if gallery is None or len(arrays) != 4:
        return None
    every = (len(queries[0]) == len(data.val_paths) == len(arrays[1])
             and len(gallery[0]) == len(data.train_index) == len(arrays[3]))
    return ((arrays[0], arrays[1]), (arrays[2], arrays[3])) if every else None


def _sample(paths: list[Path], labels: np.ndarray, most: int, seed: int):
    """At most ``most`` of the photos, a seeded choice in their order."""
    if len(paths) <= most:
        return list(paths), np.asarray(labels)
    keep = np.sort(np.random.default_rng(seed).choice(len(paths), most, replace=False))
    return [paths[i] for i in keep], np.asarray(labels)[keep]


def sample_photos(data, seed: int):
    """(queries, gallery, a phrase saying which): up to ``SAMPLE`` validation photos searched
    among up to ``GALLERY`` training photos, or, without validation photos, up to ``SAMPLE``
    training photos among themselves (gallery None); seeded."""
    train = ([data.scan.paths[row] for row in data.train_index],
             data.scan.labels[data.train_index])
    if not data.val_paths:
        queries = _sample(*train, SAMPLE, seed)
        return queries, None, f"{len(queries[0])} training photos searched among themselves"
    queries, gallery = _sample(data.val_paths, data.val_labels, SAMPLE, seed), _sample(
        *train, GALLERY, seed)
    return queries, gallery, (f"{len(queries[0])} validation photos searched among "
                              f"{len(gallery[0])} training photos")


def choose_augmentation(config, data, nets, machine, keep: dict | None = None
                        ) -> tuple[str, str]:
    """(the augmentation, a line saying why) for ``--augment auto``; ``keep`` receives the
    colour search's features under ``"start"`` where they cover the whole split
    (``_whole_split``; ``build.start_features`` hands them to the start's searches)."""
    if not config.pretrained and config.weights is None:
        return "color-agnostic", ("--augment auto: color-agnostic (a model from scratch cannot "
                                  "tell whether colour tells the classes apart)")
    if data.shards is not None:
        return "color-agnostic", ("--augment auto: color-agnostic (shards are not searched "
                                  "before training; give --augment color-preserving where "
                                  "colour tells items apart)")
    queries, gallery, which = sample_photos(data, config.seed)
    clean, gray, arrays = recall_in_colour_and_gray(
        nets.model, nets.spec, queries, gallery, machine, config.batch_size,
        config.channels_last, config.max_image_pixels)
    if keep is not None and (start := _whole_split(data, queries, gallery, arrays)):
        keep["start"] = start
    chosen = "color-preserving" if clean - gray > COLOUR_GAP else "color-agnostic"
    because = ("colour tells these classes apart" if chosen == "color-preserving"
               else "colour does not tell these classes apart")
    return chosen, (f"--augment auto: {chosen}: with {which}, the starting "
                    f"model's Recall@1 is {clean:.3f} in colour, {gray:.3f} in grayscale, so "
                    f"{because}")


def measure_colour(config, data, nets, machine, reporter, keep: dict) -> tuple[str, str]:
    """``--augment auto``'s measurement, said once; under DDP only rank 0 measures (it alone
    runs the gallery check that reuses the features) and its choice is sent to every rank."""
    chosen, why = "", ""
    if machine.distributed.is_main:
        chosen, why = choose_augmentation(config, data, nets, machine, keep)
    if machine.distributed.enabled:
        shared = [chosen, why]
        torch.distributed.broadcast_object_list(shared, src=0)
        chosen, why = shared
    reporter.message(why)
    return chosen, why
