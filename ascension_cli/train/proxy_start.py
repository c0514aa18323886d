"""``--proxy-start means``: the proxies of ``--proxy-weight`` start each at its class's mean
embedding under the starting weights, from a few training photos of the class embedded once
before the first step, instead of the paper's random (Kaiming) start, which
``SupConWithProxies`` keeps for classes without a readable photo, for training streamed from
shards, and by default.

The question it answers: random proxies pull every embedding towards an arbitrary direction
from the first step, at the proxies' own high LR; do they pull a pretrained trunk's features
apart while they find their classes (validation below the untrained model's in the first
epochs on one 99-class set)? Measured on the grocery products' validation split, it did not
help (docs/training.md), so it is not the default.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ascension_cli.data.dataset import collate, eval_photos
from ascension_cli.embedding.inference import extract_features

PHOTOS_PER_CLASS = 8  # photos of each class embedded to place its proxy


def start_proxies(run) -> int:
    """Move ``run``'s proxies to their classes' mean embeddings; the classes placed."""
    module, data, config = run.opt.loss_module, run.data, run.config
    proxies = getattr(module, "proxies", None)
    if proxies is None or data.shards is not None or config.proxy_start != "means":
        return 0
    labels = data.train_labels
    rng = np.random.default_rng(config.seed)
    chosen = np.concatenate([
        rng.permutation(np.flatnonzero(labels == label))[:PHOTOS_PER_CLASS]
        for label in range(proxies.shape[0])]).astype(np.int64)
    spec = run.nets.spec
    photos = eval_photos(spec, [data.scan.paths[data.train_index[row]] for row in chosen],
                         labels[chosen], max_pixels=config.max_image_pixels)
    loader = DataLoader(photos, batch_size=config.batch_size, shuffle=False, collate_fn=collate,
                        generator=torch.Generator().manual_seed(config.seed))  # the run's
    # random streams stay as they were
    kind = "backbone" if spec.head == "none" else "head"
    features, found, _ = extract_features(run.nets.model, loader, run.machine.device, kind,
                                          run.machine.autocast,
                                          channels_last=config.channels_last)
    placed = 0
    with torch.no_grad():
        for label in np.unique(found):
            mean = torch.from_numpy(features[found == label].mean(axis=0)).to(proxies)
            if float(mean.norm()) > 0:  # its direction; the random start's length, so a step
                row = proxies[int(label)]  # at the proxies' LR moves it as far as before
                proxies[int(label)] = mean * (row.norm() / mean.norm())
                placed += 1
    return placed
