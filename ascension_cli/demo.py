"""``ascension demo``: the whole job end to end on a dataset that ships with scikit-learn."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ascension_cli.config import TrainConfig
from ascension_cli.train.loop import Reporter, train

DEMO_MODEL = "test_convnext"
DEMO_IMAGE_SIZE = 32


def write_digits(root: Path, seed: int = 0) -> int:
    """Write scikit-learn's 1,797 handwritten digits as 32x32 colour PNGs in class folders.

    Each digit is painted in a random ink on a random paper colour: like a garment photographed
    in another colour, the class is the shape, not the colour. An untrained network groups by
    colour; colour-agnostic SupCon training has to learn the shape.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        ink = cv2.resize((image / 16.0).astype(np.float32), (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE),
                         interpolation=cv2.INTER_CUBIC).clip(0, 1)[:, :, None]
        paper_colour = rng.integers(0, 256, size=3)
        # Ink far from the paper in every channel, so each digit stays legible.
        ink_colour = np.where(paper_colour > 127, paper_colour - 128, paper_colour + 128)
        ink_colour = np.clip(ink_colour + rng.integers(-40, 40, size=3), 0, 255)
        pixels = paper_colour * (1 - ink) + ink_colour * ink
        cv2.imwrite(str(folder / f"{index:04d}.png"), pixels.round().astype(np.uint8))
    return len(digits.target)


def run_demo(
    workdir: Path, epochs: int, workers: int, reporter: Reporter
) -> tuple[float, float]:
    """Train from scratch on the digits; returns validation recall@1 before and after."""
    data_root = workdir / "digits"
    if not data_root.exists():
        count = write_digits(data_root)
        reporter.message(f"wrote {count} digit images to {data_root}")
    config = TrainConfig(
        data_root=data_root,
        model=DEMO_MODEL,
        pretrained=False,
        image_size=DEMO_IMAGE_SIZE,
        batch_size=64,
        target_batch=128,
        samples_per_class=8,
        views=2,  # what the figures below were measured with (a tiny model from scratch)
        epochs=epochs,
        warmup_epochs=min(1, epochs),
        # Measured on the validation split (recall@1 per epoch, untrained 0.44): SupCon on the
        # pooled features themselves (no head), tau 0.2 and a gentle LR (4e-4 per step) climb
        # from the first epoch (0.62, 0.67, 0.69, 0.70, 0.70 over the default 5). With the
        # projection head of SimCLR the random head first pulled the features apart (0.45,
        # 0.33, 0.31, 0.39, then up after epoch 5); at higher LRs, or over more epochs at
        # this one, the features climbed, then fell back a few points.
        temperature=0.2,
        lr=1e-4,
        head="none",
        augment="color-agnostic",
        val_fraction=0.2,
        workers=workers,
        save_dir=workdir / "checkpoints",
        resume="auto",
    )
    result = train(config, reporter)
    validated = [r.val_recall_at_1 for r in result.history if r.val_recall_at_1 is not None]
    return validated[0], validated[-1]
