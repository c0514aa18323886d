"""Build TrashNet into a class-per-folder tree for the quality benchmarks.

6 classes of discarded packaging and objects: glass, paper, cardboard, plastic, metal and
trash; 2,527 photos (512 x 384 JPEGs), one object each on a white board under varied light and
pose: a different kind of photo from the shop shelves and the product shots of the other sets.
Source: TrashNet (Gary Thung and Mindy Yang, 2017; github.com/garythung/trashnet, MIT licence).
Its own repository keeps the photos outside git, so this clones a public copy of its
``dataset-resized`` folder (the default URL); a SOURCE.txt beside the photos says where they came
from and under which licence.

    python benchmarks/get_trashnet.py                     # clones from GitHub (~140 MiB)
    python benchmarks/get_trashnet.py --source PATH       # a clone (or bare mirror) already here
    python benchmarks/bench_quality.py --sets benchmarks/cache/trashnet-6
"""

from __future__ import annotations

from pathlib import Path

from _sets import build_set, copy_photo

URL = "https://github.com/congduytran12/Trash-Classification-.git"
NAME = "trashnet-6"
CLASSES = ("cardboard", "glass", "metal", "paper", "plastic", "trash")
SOURCE = """TrashNet: Gary Thung and Mindy Yang, 2017, https://github.com/garythung/trashnet
MIT License, Copyright (c) 2017 Gary Thung
(https://github.com/garythung/trashnet/blob/master/LICENSE)
Copied from the dataset-resized folder of {source}
"""


def build(checkout: Path, destination: Path) -> dict[str, int]:
    """Copy ``dataset-resized/<class>/*.jpg`` into ``destination/<class>/``; photos per class."""
    counts: dict[str, int] = {}
    for name in CLASSES:
        photos = sorted((checkout / "dataset-resized" / name).glob("*.jpg"))
        if not photos:
            raise SystemExit(f"error: no photos of {name!r} in {checkout}/dataset-resized")
        (destination / name).mkdir(parents=True)
        for photo in photos:
            copy_photo(photo, checkout, destination / name / photo.name)
        counts[name] = len(photos)
    (destination / "SOURCE.txt").write_text(SOURCE.format(source=URL), encoding="utf-8")
    return counts


def main() -> None:
    build_set(__doc__, URL, NAME, build)


if __name__ == "__main__":
    main()
