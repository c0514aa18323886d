import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ascension_cli.data.folder import (
    ImageDecodeError,
    decode_image,
    load_image,
    scan_folder,
    stratified_split,
)
from ascension_cli.errors import DataError


def png_bytes(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


def test_scan_sorts_classes_and_counts_what_it_skips(tmp_path):
    root = tmp_path / "data"
    image = png_bytes(np.zeros((8, 8, 3), np.uint8))
    for name in ("zebra", "apple"):
        (root / name).mkdir(parents=True)
        (root / name / "a.png").write_bytes(image)
    (root / "apple" / "nested" / "deeper").mkdir(parents=True)
    (root / "apple" / "nested" / "deeper" / "b.png").write_bytes(image)
    (root / "apple" / ".hidden.png").write_bytes(image)
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "apple" / "empty.jpg").write_bytes(b"")
    (root / "empty_class").mkdir()
    (root / "loose.png").write_bytes(image)
    (root / ".git").mkdir()

    scan = scan_folder(root)
    assert scan.classes == ["apple", "zebra"]
    assert [p.relative_to(root).as_posix() for p in scan.paths] == [
        "apple/a.png", "apple/nested/deeper/b.png", "zebra/a.png"]
    assert scan.labels.tolist() == [0, 0, 1]
    assert scan.skipped == {
        "hidden": 2, "not an image": 1, "empty file": 1, "empty class folder": 1,
        "outside a class folder": 1,
    }


def test_symlink_loop_does_not_hang(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
    assert len(scan_folder(root)) == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "data folder not found"),
        (lambda root: root.mkdir(), "no class folders"),
        (lambda root: root.mkdir() or (root / "loose.jpg").write_bytes(b"x"), "no class folders"),
        (lambda root: (root / "a").mkdir(parents=True), "no images found"),
    ],
)
def test_unusable_roots_raise_data_error(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        scan_folder(root)


def test_fixed_class_list_for_validation_tree(tmp_path):
    root = tmp_path / "val"
    for name in ("b", "c"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    scan = scan_folder(root, classes=["a", "b"])
    assert scan.classes == ["a", "b"]
    assert scan.labels.tolist() == [1]
    assert scan.skipped["unknown class folder"] == 1


def test_split_is_stratified_deterministic_and_keeps_a_training_image():
    labels = np.repeat(np.arange(5), [1, 2, 10, 20, 7])
    train, val = stratified_split(labels, 0.2, seed=3)
    again_train, again_val = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(labels)
    assert np.bincount(labels[val], minlength=5).tolist() == [0, 0, 2, 4, 2]
    assert set(labels[train]) == set(range(5))
    _, other_val = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(val, other_val)


def test_decode_colour_png_to_rgb():
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    rgb = decode_image(png_bytes(bgr))
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 255]


def test_decode_grayscale_and_16_bit():
    gray = decode_image(png_bytes(np.full((5, 5), 200, np.uint8)))
    assert gray.shape == (5, 5, 3) and gray[0, 0].tolist() == [200, 200, 200]
    deep = decode_image(png_bytes(np.full((5, 5, 3), 65535, np.uint16)))
    assert deep.dtype == np.uint8 and deep.max() == 255


def test_decode_rgba_composites_on_white():
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 2] = 255  # red, fully transparent except one pixel
    bgra[0, 0, 3] = 255
    rgb = decode_image(png_bytes(bgra))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[1, 1].tolist() == [255, 255, 255]


def test_decode_honours_exif_orientation():
    image = Image.new("RGB", (20, 10), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).shape == (20, 10, 3)


def test_decode_cmyk_jpeg():
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, format="JPEG")
    rgb = decode_image(buffer.getvalue())
    assert rgb.shape == (8, 8, 3)
    assert rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60  # red


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", png_bytes(np.zeros((16, 16, 3), np.uint8))[:40]],
)
def test_corrupt_bytes_raise_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_load_image_unicode_name_and_missing_file(tmp_path):
    path = tmp_path / "façade_日本.png"
    path.write_bytes(png_bytes(np.zeros((3, 3, 3), np.uint8)))
    assert load_image(path).shape == (3, 3, 3)
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_image(Path(tmp_path / "gone.png"))


def test_large_jpeg_decodes_at_reduced_scale_keeping_orientation():
    image = Image.new("RGB", (400, 200), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 200 wide, 400 high
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    data = buffer.getvalue()
    assert decode_image(data).shape == (400, 200, 3)
    reduced = decode_image(data, min_side=50)  # short side 200 -> 1/4 scale keeps 50
    assert reduced.shape == (100, 50, 3)
    assert decode_image(data, min_side=120).shape == (400, 200, 3)  # 1/2 would go below 120
    assert abs(int(reduced[..., 0].mean()) - int(decode_image(data)[..., 0].mean())) < 5
