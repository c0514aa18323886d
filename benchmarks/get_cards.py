"""Build the playing-cards set into a class-per-folder tree for the quality benchmarks.

53 classes (the 52 cards of a deck and the joker); 8,154 images of single cards from many decks
(photos, scans and web images), cropped to the card, 224 x 224: a many-class set of a new kind
(printed designs that differ by a pip or a suit, as packaging variants do), with more classes
than a target batch holds. Source: "Cards Image Dataset - Classification" by Gerry (Kaggle user
gpiosenka), published there under CC0 (public domain). Kaggle is out of reach here, so this
clones a public GitHub copy of its ``train``, ``valid`` and ``test`` folders (the default URL),
checking out only those; the three are pooled, since ``bench_quality.py`` makes its own fixed
split. A photo whose bytes recur under another class is a label error and is left out; a
repeat within a class is kept once. A SOURCE.txt beside the photos says where they came from
and under which licence.

    python benchmarks/get_cards.py                        # clones from GitHub (~150 MiB)
    python benchmarks/get_cards.py --source PATH          # a clone (or bare mirror) already here
    python benchmarks/bench_quality.py --sets benchmarks/cache/playing-cards-53
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

from _sets import build_set, copy_photo, photo_bytes

URL = "https://github.com/hiroonwijekoon/pytorch-cnn-playing-cards-classifier.git"
NAME = "playing-cards-53"
RANKS = ("ace", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "jack", "queen", "king")
SUITS = ("clubs", "diamonds", "hearts", "spades")
CLASSES = tuple(f"{rank} of {suit}" for rank in RANKS for suit in SUITS) + ("joker",)
SPLITS = ("train", "valid", "test")
SOURCE = """Cards Image Dataset - Classification, by Gerry (Kaggle user gpiosenka),
https://www.kaggle.com/datasets/gpiosenka/cards-image-datasetclassification
Licence as published there: CC0 1.0 (public domain)
Copied from the dataset/{{train,valid,test}} folders of {source}
Left out: {dropped} photos whose bytes recur (under another class, or again in one class)
"""


def folder(name: str) -> str:
    """A class's folder name: its words joined by hyphens (``ace-of-clubs``)."""
    return name.replace(" ", "-")


def photos(checkout: Path) -> dict[str, list[Path]]:
    """Each class's photos over the three splits, in split and file order."""
    found: dict[str, list[Path]] = {}
    for name in CLASSES:
        found[name] = [photo for split in SPLITS
                       for photo in sorted((checkout / "dataset" / split / name).glob("*.jpg"))]
        if not found[name]:
            raise SystemExit(f"error: no photos of {name!r} in {checkout}/dataset")
    return found


def kept(found: dict[str, list[Path]], checkout: Path) -> dict[str, list[Path]]:
    """``found`` less label errors (bytes under two classes: every copy goes) and repeats
    within a class (the first copy stays)."""
    digest = {photo: hashlib.sha256(photo_bytes(photo, checkout)).hexdigest()
              for paths in found.values() for photo in paths}
    classes_of: dict[str, set[str]] = defaultdict(set)
    for name, paths in found.items():
        for photo in paths:
            classes_of[digest[photo]].add(name)
    keep: dict[str, list[Path]] = {}
    for name, paths in found.items():
        seen: set[str] = set()
        keep[name] = []
        for photo in paths:
            if len(classes_of[digest[photo]]) == 1 and digest[photo] not in seen:
                seen.add(digest[photo])
                keep[name].append(photo)
    return keep


def build(checkout: Path, destination: Path) -> dict[str, int]:
    """Copy each class's kept photos into ``destination/<class>/<split>-<file>``; photos per
    class."""
    found = photos(checkout)
    keep = kept(found, checkout)
    counts: dict[str, int] = {}
    for name, paths in keep.items():
        (destination / folder(name)).mkdir(parents=True)
        for photo in paths:
            split = photo.parent.parent.name
            copy_photo(photo, checkout, destination / folder(name) / f"{split}-{photo.name}")
        counts[folder(name)] = len(paths)
    dropped = sum(map(len, found.values())) - sum(counts.values())
    (destination / "SOURCE.txt").write_text(SOURCE.format(source=URL, dropped=dropped),
                                            encoding="utf-8")
    return counts


def main() -> None:
    build_set(__doc__, URL, NAME, build, only=("dataset",))


if __name__ == "__main__":
    main()
