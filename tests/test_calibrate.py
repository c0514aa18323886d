"""`ascension calibrate`: the "not in the catalogue" threshold for a target false match rate,
written into the catalogue and used by search (and serve) unless another is given."""

import json
import shutil

import numpy as np
from typer.testing import CliRunner

from ascension_cli import api
from ascension_cli.catalog.store import load_catalog
from ascension_cli.cli.app import app
from tests.test_catalog import train_tiny

runner = CliRunner()


def split_photos(data, root):
    """A catalogue folder of three classes (five photos each), and calibration photos: the
    other photos of those classes and every photo of the fourth class."""
    known, held = root / "known", root / "calibration"
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        photos = sorted(folder.glob("*.png"))
        in_catalogue = photos[:5] if folder.name != "cross" else []
        for photo in photos:
            target = (known if photo in in_catalogue else held) / folder.name / photo.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, target)
    return known, held


def test_calibrate_records_a_threshold_that_search_uses(place, tmp_path):
    data, checkpoint = train_tiny(tmp_path)
    known, held = split_photos(data, tmp_path)
    catalog = place("cat")
    api.index(checkpoint, known, catalog, workers=0, **place.options)
    result = runner.invoke(app, ["calibrate", catalog, str(held), "--target-fmr",
                                 "0.25", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "written into the catalogue" in result.output
    saved = load_catalog(catalog).calibration
    if place.folder:  # kept in catalog.json (on Milvus: in the collection's properties)
        assert json.loads((tmp_path / "cat" / "catalog.json").read_text())["calibration"] == saved
    assert saved["unknown_classes"] == ["cross"] and saved["unknown_queries"] == 8
    assert saved["known_queries"] == 9 and saved["fmr"] <= 0.25 and saved["items"] == 15
    assert load_catalog(catalog).threshold == saved["threshold"]

    # For FMR 25 % on new photos, of 8 unknowns it refuses the round(0.25 x 9) = 2nd highest
    # and all below: it accepts 1.
    searched = api.search(catalog, held / "cross", k=1, workers=0,
                          threshold=-1.0)
    best = np.sort([r.matches[0].similarity for r in searched])
    assert np.sum(best >= saved["threshold"]) <= 1  # the margin keeps float noise out
    assert np.sum(best >= saved["threshold"] - 1e-4 - 1e-6) == 2  # one more would pass

    # search uses it by default; an explicit --threshold wins.
    out = tmp_path / "r.json"
    runner.invoke(app, ["search", catalog, str(held / "cross"), "--json", str(out),
                        "--workers", "0"])
    assert json.loads(out.read_text())["threshold"] == saved["threshold"]
    runner.invoke(app, ["search", catalog, str(held / "cross"), "--json", str(out),
                        "--workers", "0", "--threshold", "0.5"])
    assert json.loads(out.read_text())["threshold"] == 0.5

    # A catalogue grown since its calibration says so, and keeps the calibration.
    api.index(checkpoint, held / "circle", catalog, add=True, workers=0)
    grown = load_catalog(catalog)
    assert grown.threshold == saved["threshold"] and "calibrated" in grown.calibration_note()
    result = runner.invoke(app, ["search", catalog, str(held / "cross"), "--workers", "0"])
    assert "run `ascension calibrate` again" in result.output


def test_calibration_without_unknown_photos_is_one_line(tmp_path):
    data, checkpoint = train_tiny(tmp_path)
    api.index(checkpoint, data, tmp_path / "cat", workers=0)
    result = runner.invoke(app, ["calibrate", str(tmp_path / "cat"), str(data), "--workers", "0"])
    assert result.exit_code == 2
    assert "photos of items the catalogue lacks" in result.output
    assert "--unknown-classes" in result.output and len(result.output.strip().splitlines()) == 1
    # With classes held out of the catalogue's own, the same photos calibrate.
    calibrated = api.calibrate(tmp_path / "cat", data, unknown_classes=0.25, workers=0)
    assert calibrated.calibration["unknown_classes"] and calibrated.threshold is not None
