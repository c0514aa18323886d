"""--cache-images: each image decoded once, the same pixels as decoding every epoch."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ascension_cli.data import cache as cache_module
from ascension_cli.data.augment import AUGMENTATIONS, train_transform
from ascension_cli.data.cache import DecodedImages, shrink
from ascension_cli.data.dataset import Failed, MultiViewDataset
from ascension_cli.data.folder import ImageDecodeError, load_image, scan_folder
from ascension_cli.errors import ConfigError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_shrink_reduces_the_short_side_only_and_keeps_the_aspect():
    wide = np.zeros((300, 600, 3), np.uint8)
    assert shrink(wide, 100).shape == (100, 200, 3)
    assert shrink(np.zeros((600, 90, 3), np.uint8), 45).shape == (300, 45, 3)
    small = np.zeros((40, 50, 3), np.uint8)
    assert shrink(small, 100) is small  # never enlarged


def test_cache_returns_the_decoded_pixels_across_chunks(dataset, tmp_path, monkeypatch):
    big = np.random.default_rng(0).integers(0, 256, (240, 160, 3), dtype=np.uint8)
    cv2.imwrite(str(dataset / "circle" / "big.png"), big)
    (dataset / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    scan = scan_folder(dataset)
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 5000)  # several buffers
    progress = []
    images = DecodedImages.build(scan.paths, keep_side=48, threads=2,
                                 on_progress=progress.append)
    assert len(images) == len(scan) and sum(progress) == len(scan)
    assert len(images._chunks) > 1 and images.failed == 1
    for index, path in enumerate(scan.paths):
        if path.name == "broken.png":
            with pytest.raises(ImageDecodeError, match="broken.png"):
                images[index]
            continue
        expected = shrink(load_image(path), 48)
        if path.name == "big.png":
            assert expected.shape == (72, 48, 3)
        assert np.array_equal(images[index], expected), path
        assert not images[index].flags.writeable  # augmentations cannot write into it
    assert images.nbytes == sum(images[i].nbytes for i in range(len(scan))
                                if scan.paths[i].name != "broken.png")


def test_cache_past_the_memory_limit_is_refused(dataset):
    scan = scan_folder(dataset)
    with pytest.raises(ConfigError, match="cache_images.*train without it"):
        DecodedImages.build(scan.paths, keep_side=64, memory_limit=10_000)


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_views_from_the_cache_equal_views_from_files(dataset, augment):
    scan = scan_folder(dataset)
    transform = train_transform(augment, 24, MEAN, STD)
    cached = MultiViewDataset(scan.paths, scan.labels, transform, views=2,
                              cache=DecodedImages.build(scan.paths, keep_side=64))
    plain = MultiViewDataset(scan.paths, scan.labels, transform, views=2)
    for index in range(len(scan)):
        for seed in (index, index + 1000):
            torch.testing.assert_close(cached[(index, seed)][0], plain[(index, seed)][0],
                                       rtol=0, atol=0)


def test_failed_image_in_the_cache_is_a_failed_sample(dataset):
    (dataset / "cross" / "broken.png").write_bytes(b"nothing")
    scan = scan_folder(dataset)
    broken = next(i for i, p in enumerate(scan.paths) if p.name == "broken.png")
    data = MultiViewDataset(scan.paths, scan.labels, train_transform("none", 24, MEAN, STD), 1,
                            cache=DecodedImages.build(scan.paths, keep_side=48))
    assert isinstance(data[(broken, 0)], Failed)


def test_a_stop_request_ends_the_build_between_windows(dataset):
    scan = scan_folder(dataset)
    asked = []

    def should_stop():
        asked.append(True)
        return len(asked) > 1  # after the first window

    progress = []
    assert DecodedImages.build(scan.paths, keep_side=64, threads=1, should_stop=should_stop,
                               on_progress=progress.append) is None
    assert progress == [4]  # one window of 4 files per thread was decoded, no more
