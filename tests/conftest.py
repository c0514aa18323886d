"""Shared fixtures: tiny generated datasets and the paths of the shared real data."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

# pytest runs two worker processes (pyproject.toml): each keeps to one thread, and so do the
# processes its tests start, so that on 2 cores four threads do not fight for two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.safetensors"
SIGN_DIGITS = SHARED / "data" / "sign-language-digits"

# The command line, started through the interpreter that runs the tests: a user who runs
# `.venv/bin/python -m pytest` without activating the environment has no `ascension` on PATH.
CLI = (sys.executable, "-m", "ascension_cli")


def chromium() -> str | None:
    """Headless Chromium for the browser tests: required under CI (which sets CI=true, and whose
    .ci/run installs it) or with ASCENSION_REQUIRE_BROWSER=1, skipped elsewhere."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("ASCENSION_REQUIRE_BROWSER") or os.environ.get("CI") == "true":
            pytest.fail("chromium is required here (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A coloured shape on a coloured background, jittered: the class is the shape."""
    background = rng.integers(0, 256, size=3).tolist()
    ink = [(c + 128 + int(rng.integers(-30, 30))) % 256 for c in background]
    image = np.full((size, size, 3), background, dtype=np.uint8)
    centre = (size // 2 + int(rng.integers(-3, 4)), size // 2 + int(rng.integers(-3, 4)))
    radius = size // 3 + int(rng.integers(-2, 3))
    if shape == "circle":
        cv2.circle(image, centre, radius, ink, -1)
    elif shape == "square":
        cv2.rectangle(image, (centre[0] - radius, centre[1] - radius),
                      (centre[0] + radius, centre[1] + radius), ink, -1)
    elif shape == "triangle":
        points = np.array(
            [[centre[0], centre[1] - radius], [centre[0] - radius, centre[1] + radius],
             [centre[0] + radius, centre[1] + radius]],
            dtype=np.int32,
        )
        cv2.fillPoly(image, [points], ink)
    elif shape == "cross":
        cv2.line(image, (centre[0] - radius, centre[1] - radius),
                 (centre[0] + radius, centre[1] + radius), ink, 3)
        cv2.line(image, (centre[0] - radius, centre[1] + radius),
                 (centre[0] + radius, centre[1] - radius), ink, 3)
    elif shape == "ring":
        cv2.circle(image, centre, radius, ink, 3)
    else:
        cv2.rectangle(image, (2, centre[1] - 3), (size - 3, centre[1] + 3), ink, -1)
    return image


def make_dataset(
    root: Path, classes: int = 4, per_class: int = 8, size: int = 32, seed: int = 0
) -> Path:
    """Write ``root/<shape>/<i>.png`` images; returns root."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES[:classes]:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = draw_shape(shape, size, rng)
            cv2.imwrite(str(folder / f"{index:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def start_weights(tmp_path: Path):
    """Starting weights for test_efficientnet, as a user's --weights file: (its path, the
    state dict)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    path = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return path, backbone.state_dict()


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never download: a pretrained request without --weights must fail fast and clearly.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def planned(config, classes: int, images: int = 1000):
    """``plan_run`` of ``config`` on ``classes`` classes, with a fixed setup (image size,
    workers, augmentation, stages kept) that the data-dependent defaults do not read."""
    from ascension_cli.train.plan import Setup, plan_run

    setup = Setup((32, "test"), (0, "test"), ("color-agnostic", "test"), (0, "test"))
    return plan_run(config, classes, images, setup)


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A Milvus Lite server for the session (``tests/stores.py``): required under CI, whose
    .ci/run installs the dev extra, skipped elsewhere when pymilvus or milvus-lite is absent.
    ``ASCENSION_TEST_MILVUS=HOST:PORT`` runs the suite against a server you started instead."""
    import importlib.util

    from tests.stores import GivenMilvus, Milvus

    if os.environ.get("ASCENSION_TEST_MILVUS"):
        yield GivenMilvus(os.environ["ASCENSION_TEST_MILVUS"])
        return

    missing = [name for name in ("pymilvus", "milvus_lite")
               if importlib.util.find_spec(name) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing[0]} is required here (.ci/run installs the dev extra)")
        pytest.skip(f"{missing[0]} is not installed (pip install -e '.[dev]')")
    server = Milvus(tmp_path_factory.mktemp("milvus"))
    yield server
    server.stop()


@pytest.fixture(params=["folder", "milvus"])
def place(request, tmp_path):
    """Where the test's catalogues live: run once in folders, once on a Milvus server."""
    from tests.stores import Place

    server = request.getfixturevalue("milvus_server") if request.param == "milvus" else None
    return Place(request.param, tmp_path, server)
