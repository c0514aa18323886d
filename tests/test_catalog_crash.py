"""A catalogue survives kill -9 at any instant of an add or a calibration: it loads, searches,
and holds exactly the items of the last add that committed (and a whole calibration or none);
photos of an interrupted add are removed by the next writer."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from typer.testing import CliRunner  # noqa: E402

from ascension_cli.catalog.folder_store import FolderStore  # noqa: E402
from ascension_cli.catalog.search import CatalogSearcher  # noqa: E402
from ascension_cli.catalog.store import load_catalog  # noqa: E402
from ascension_cli.catalog_layout import PHOTOS_FOLDER  # noqa: E402
from ascension_cli.cli.app import app  # noqa: E402
from tests.test_catalog import train_tiny  # noqa: E402

RUN_OPTIONS = {"workers": 0, "device": "cpu", "precision": "auto", "channels_last": True,
               "batch_size": 64}
# Adds two photos at a time, for ever, through the service's own add path.
WRITER = """
import json, sys
from pathlib import Path
from ascension_cli.serve.lookup import Lookup
catalog, photo = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()
lookup = Lookup(catalog, json.loads(sys.argv[3]), 100_000_000)
print("ready", flush=True)
while True:
    lookup.add(lookup.check_images([("a.png", photo), ("b.png", photo)]), "added", "token:t")
"""


def kept_files(catalog: Path) -> set[str]:
    """The photos on disk under photos/ (and any half-written one), as stored names."""
    folder = catalog / PHOTOS_FOLDER
    return ({p.relative_to(catalog).as_posix() for p in folder.rglob("*") if p.is_file()}
            if folder.exists() else set())


def held_files(catalog: Path) -> set[str]:
    """The photos the catalogue holds, once a writer has settled what a killed one left."""
    with FolderStore(catalog).writing():
        pass
    return {name for name in load_catalog(catalog).stored or () if name}


def test_kill_9_at_random_moments_of_adds_never_loses_the_catalogue(tmp_path):
    data, checkpoint = train_tiny(tmp_path)
    catalog = tmp_path / "cat"
    built = CliRunner().invoke(app, ["index", str(checkpoint), str(data), "-o", str(catalog),
                                     "--workers", "0"])
    assert built.exit_code == 0, built.output
    base = len(load_catalog(catalog))
    photo = data / "square" / "001.png"
    rng = random.Random(0)
    counts = [base]
    for _ in range(20):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(catalog), str(photo),
                                   json.dumps(RUN_OPTIONS)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.5))
        writer.kill()
        writer.wait(timeout=30)
        writer.stdout.close()

        found = load_catalog(catalog)  # loads: the old catalogue or the new one, whole
        assert len(found) == len(found.vectors) == len(found.labels)
        assert (len(found) - base) % 2 == 0 and len(found) >= counts[-1]  # whole adds, none lost
        counts.append(len(found))
        assert all(Path(path).is_file() for path in found.paths)
        results = CatalogSearcher(found).match(found.vectors[:1], ["q"], 3)
        assert results[0].matches[0].similarity > 0.999
        generations = sorted(p.name for p in catalog.glob("items-*.npz"))
        assert len(generations) <= 3, generations  # old generations are removed
    assert counts[-1] > base, f"no add ever committed in 20 lives: {counts}"

    assert kept_files(catalog) == held_files(catalog)  # an interrupted add's photos are gone
    assert not list(catalog.glob(".*.tmp"))


# Calibrates, then adds one new photo with `index --add`, for ever, through the Python API.
CALIBRATE_AND_ADD = """
import shutil, sys
from pathlib import Path
from ascension_cli import api
import ascension_cli.catalog.build, ascension_cli.catalog.calibrate  # torch and the rest, loaded
catalog, checkpoint, held, extra, photo = map(Path, sys.argv[1:6])
print("ready", flush=True)
for number in range(10_000):
    api.calibrate(catalog, held, target_fmr=0.25, workers=0)
    shutil.copy(photo, extra / "square" / f"new-{sys.argv[6]}-{number}.png")
    api.index(checkpoint, extra, catalog, add=True, workers=0)
"""


def test_kill_9_during_calibration_or_index_add_leaves_a_whole_catalogue(tmp_path):
    from ascension_cli import api
    from tests.test_calibrate import split_photos

    data, checkpoint = train_tiny(tmp_path)
    known, held = split_photos(data, tmp_path)
    catalog, extra = tmp_path / "cat", tmp_path / "extra"
    api.index(checkpoint, known, catalog, workers=0)
    (extra / "square").mkdir(parents=True)
    # One calibration and one add, timed here: the kills fall anywhere from early in the first
    # calibration to the second cycle, whatever the machine's speed.
    started = time.perf_counter()
    api.calibrate(catalog, held, target_fmr=0.25, workers=0)
    shutil.copy(data / "square" / "001.png", extra / "square" / "first.png")
    api.index(checkpoint, extra, catalog, add=True, workers=0)
    cycle = time.perf_counter() - started
    base = len(load_catalog(catalog))
    first_calibration = load_catalog(catalog).calibration  # of the catalogue before that add
    rng = random.Random(1)
    for life in range(8):
        writer = subprocess.Popen(
            [sys.executable, "-c", CALIBRATE_AND_ADD, str(catalog), str(checkpoint), str(held),
             str(extra), str(data / "square" / "001.png"), str(life)],
            stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.1 * cycle, 2.2 * cycle))
        writer.kill()
        writer.wait(timeout=30)
        writer.stdout.close()

        found = load_catalog(catalog)  # loads, whole: old or new, never half of each
        assert len(found) == len(found.vectors) == len(found.labels) >= base
        added = {p.name for p in (extra / "square").iterdir()}
        assert len(found) - base <= len(added)  # only photos an add was given
        assert all(Path(path).is_file() for path in found.paths)
        assert -1 <= found.threshold <= 1  # a calibration, whole: the first one or a later one
        assert {"fmr", "fnmr", "items", "unknown_classes"} <= set(found.calibration)
    final = load_catalog(catalog)
    assert len(final) > base, "no add ever committed in 8 lives"
    assert final.calibration["items"] > first_calibration["items"], (
        "no calibration committed in 8 lives")
    shutil.copy(data / "square" / "002.png", extra / "square" / "last.png")
    api.index(checkpoint, extra, catalog, add=True, workers=0)
    assert not list(catalog.glob(".*.tmp"))  # a dead writer's half-written files go at the next
