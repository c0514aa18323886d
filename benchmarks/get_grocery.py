"""Build the Grocery Store Dataset into a class-per-folder tree for the quality benchmarks.

81 fine-grained classes of fruit, vegetables and cartons (varieties of apples, juices, milks,
each a class; colour is among what tells them apart), 5,421 natural photos taken with a phone
in shops (348 x 348 JPEGs). Source: the public repository marcusklasson/GroceryStoreDataset
(Klasson, Zhang, Kjellstrom, WACV 2019), MIT licence; its LICENSE is kept beside the photos.

The train, val and test lists of the repository are pooled: ``bench_quality.py`` splits every
set itself (per class, seeded), so this set is measured as the others are. The tree goes into
``benchmarks/cache/`` (ignored by git: photos are never committed), built in a temporary folder
and renamed into place, so an interrupted build leaves nothing half made.

    python benchmarks/get_grocery.py                      # clones from GitHub (116 MiB)
    python benchmarks/get_grocery.py --source PATH        # a clone (or bare mirror) already here
    python benchmarks/bench_quality.py --sets benchmarks/cache/grocery-store-81
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from _sets import build_set, copy_photo

URL = "https://github.com/marcusklasson/GroceryStoreDataset.git"
NAME = "grocery-store-81"


def class_names(dataset: Path) -> dict[int, str]:
    """Fine class id -> name, from classes.csv."""
    with open(dataset / "classes.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    return {int(row[1]): row[0].strip() for row in rows if len(row) >= 2}


def listed_photos(dataset: Path) -> list[tuple[Path, int]]:
    """(photo, fine class id) of every line of train.txt, val.txt and test.txt."""
    photos = []
    for part in ("train", "val", "test"):
        for line in (dataset / f"{part}.txt").read_text(encoding="utf-8").splitlines():
            fields = [field.strip() for field in line.split(",")]
            if len(fields) >= 2 and fields[0]:
                photos.append((dataset / fields[0], int(fields[1])))
    return photos


def build(checkout: Path, destination: Path) -> dict[str, int]:
    """Copy the listed photos into ``destination/<class>/<part>_<file>``; photos per class."""
    dataset = checkout / "dataset"
    names = class_names(dataset)
    counts: dict[str, int] = {}
    for photo, label in listed_photos(dataset):
        if not photo.is_file():
            raise SystemExit(f"error: {photo} is listed but missing: is {checkout} a full clone?")
        folder = destination / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        part = photo.relative_to(dataset).parts[0]
        copy_photo(photo, checkout, folder / f"{part}_{photo.name}")
        counts[names[label]] = counts.get(names[label], 0) + 1
    shutil.copyfile(checkout / "LICENSE", destination / "LICENSE")
    return counts


def main() -> None:
    build_set(__doc__, URL, NAME, build)


if __name__ == "__main__":
    main()
