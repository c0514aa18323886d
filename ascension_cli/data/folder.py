"""Scan a class-per-folder tree, decode images robustly with OpenCV, and split train/val."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ascension_cli.data.image_header import FORMATS, JPEG_MAGIC, PNG_MAGIC, image_size
from ascension_cli.errors import DataError, ImageDecodeError
from ascension_cli.formats import DEFAULT_MAX_PIXELS

# We report unreadable files ourselves, once, in one line; OpenCV's own decoder chatter on stderr
# would only repeat it less clearly.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def item_in_two_classes(items: Iterable[str], classes: Iterable[str | None]
                        ) -> tuple[str, str, str] | None:
    """The first item id filed under two classes, as (item, its first class, the other), or
    None: an item is one product, of one class (unlabelled photos, class None, are left out)."""
    first: dict[str, str] = {}
    for item, name in zip(items, classes, strict=True):
        if name is None:
            continue
        known = first.setdefault(item, name)
        if known != name:
            return item, known, name
    return None


@dataclass
class FolderScan:
    """What a scan of a folder tree or a manifest found: the usable samples and what was
    skipped, with reasons. A manifest may also give each image a split, query/gallery roles
    and an item id (None where it has no such column); ``skipped_lines`` names the manifest
    lines of each reason."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    splits: np.ndarray | None = None  # "train" | "validation" | "test" per image
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    item_ids: list[str] | None = None
    skipped_lines: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    def name(self, index: int) -> str:
        """Image ``index``'s path as files and reports name it: relative to the root when under
        it (a folder tree always is), else absolute."""
        path = self.paths[index]
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def subset(self, keep: np.ndarray) -> FolderScan:
        """The images where the boolean mask ``keep`` is set (classes and skips unchanged)."""
        rows = np.flatnonzero(keep)

        def pick(values):
            return None if values is None else values[rows]

        return FolderScan(
            self.root, self.classes, [self.paths[i] for i in rows], self.labels[rows],
            self.skipped, pick(self.splits), pick(self.is_query), pick(self.is_gallery),
            None if self.item_ids is None else [self.item_ids[i] for i in rows],
            self.skipped_lines,
        )

    def skip_summary(self) -> str | None:
        """One line naming what was skipped and, for a manifest, on which lines."""
        if not self.skipped:
            return None

        def lines(reason: str) -> str:
            numbers = self.skipped_lines.get(reason, [])
            if not numbers:
                return ""
            shown = ", ".join(str(n) for n in numbers[:5])
            more = f" and {len(numbers) - 5} more" if len(numbers) > 5 else ""
            return f" (line{'s' if len(numbers) > 1 else ''} {shown}{more})"

        parts = [f"{count} {reason}{lines(reason)}" for reason, count in sorted(
            self.skipped.items())]
        return f"skipped {sum(self.skipped.values())}: " + "; ".join(parts)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _class_images(class_dir: Path, skipped: Counter) -> list[Path]:
    """Image files under one class folder, nested folders included, in a stable order."""
    found: list[Path] = []
    # followlinks=False: a symlinked folder could loop back on itself.
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        hidden_dirs = [name for name in dirnames if _is_hidden(name)]
        if hidden_dirs:
            skipped["hidden"] += len(hidden_dirs)
        dirnames[:] = sorted(name for name in dirnames if not _is_hidden(name))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_hidden(name):
                skipped["hidden"] += 1
            elif (problem := unusable(path, missing="broken link")) is not None:
                skipped[problem] += 1
            else:
                found.append(path)
    return found


def unusable(path: Path, missing: str = "missing file") -> str | None:
    """Why an image file cannot be used (``missing`` names a path that does not exist), or
    None."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "not an image"
    if not path.exists():
        return missing
    if not path.is_file():  # a named pipe or device: reading it could block forever
        return "not a regular file"
    if path.stat().st_size == 0:
        return "empty file"
    return None


def scan_folder(root: str | Path, classes: list[str] | None = None) -> FolderScan:
    """Find ``root/<class>/<image>`` files.

    ``classes`` fixes the class list and its order (a validation tree must use the training
    classes); folders not in it are skipped and counted.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    skipped: Counter = Counter()
    class_dirs: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if _is_hidden(entry.name):
            skipped["hidden"] += 1
        elif entry.is_dir():
            class_dirs[entry.name] = entry
        else:
            skipped["outside a class folder"] += 1
    if classes is not None:
        unknown = sorted(set(class_dirs) - set(classes))
        skipped["unknown class folder"] += len(unknown)
        class_dirs = {name: class_dirs[name] for name in classes if name in class_dirs}
    if not class_dirs:
        raise DataError(
            f"no class folders in {root}: expected {root}/<class name>/<image files>"
        )
    names = list(classes) if classes is not None else []
    paths: list[Path] = []
    labels: list[int] = []
    for name, class_dir in class_dirs.items():
        images = _class_images(class_dir, skipped)
        if not images:
            skipped["empty class folder"] += 1
            continue
        if classes is None:
            names.append(name)
        label = names.index(name)
        paths.extend(images)
        labels.extend([label] * len(images))
    if not paths:
        raise DataError(f"no images found under {root} (extensions: {_extensions()})")
    return FolderScan(root, names, paths, np.asarray(labels, dtype=np.int64), skipped)


def scan_images(root: str | Path) -> FolderScan:
    """A class-per-folder tree, or a flat folder of unlabelled images (labels -1, no classes)."""
    root = Path(root)
    if root.is_dir() and not any(
        entry.is_dir() and not _is_hidden(entry.name) for entry in root.iterdir()
    ):
        skipped: Counter = Counter()
        paths = [
            path for path in _class_images(root, skipped) if path.parent == root
        ]
        if not paths:
            raise DataError(f"no images found in {root} (extensions: {_extensions()})")
        return FolderScan(root, [], paths, np.full(len(paths), -1, dtype=np.int64), skipped)
    return scan_folder(root)


def list_images(items: list[Path]) -> list[Path]:
    """Image files named directly, and every image under named folders (sorted, hidden skipped).

    A missing path, a folder without images, or an image named directly that cannot be decoded
    is a DataError (one found in a folder is skipped later, when it is read).
    """
    paths: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(
                path for path in item.rglob("*")
                if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
                and not any(_is_hidden(part) for part in path.relative_to(item).parts)
            )
            if not found:
                raise DataError(f"no images in folder {item}")
            paths.extend(found)
        elif item.is_file():
            try:
                load_image(item)
            except ImageDecodeError as exc:
                raise DataError(str(exc)) from None
            paths.append(item)
        else:
            raise DataError(f"query image not found: {item}")
    return paths


def _extensions() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a per-class train/val split, the same for the same labels and seed.

    Every class keeps at least one training image; a class's share of validation images is
    ``round(n * val_fraction)``, raised from 1 to 2 where the class has 4 or more images: a lone
    validation image has no same-class neighbour, so it could never count in recall.
    """
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng = np.random.default_rng([seed, int(label)])
        members = members[rng.permutation(len(members))]
        n_val = min(int(round(len(members) * val_fraction)), len(members) - 1)
        if n_val == 1 and len(members) >= 4:
            n_val = 2
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        return (np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    info = np.iinfo(image.dtype)
    scaled = (image.astype(np.float64) - info.min) / (info.max - info.min)
    return (scaled * 255.0 + 0.5).astype(np.uint8)


def _composite_on_white(bgra: np.ndarray) -> np.ndarray:
    # Product photos often have transparent backgrounds whose hidden colour is arbitrary;
    # white is what a person sees.
    alpha = bgra[..., 3:4].astype(np.float32) / 255.0
    colour = bgra[..., :3].astype(np.float32)
    return (colour * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, without decoding; None if it cannot be read."""
    found = image_size(data)
    return None if found is None else found[1]


def _checked_size(data: bytes, name: str, max_pixels: int) -> tuple[int, int]:
    """The header's (width, height), refusing unknown formats, unreadable headers and bombs."""
    found = image_size(data)
    if found is None:
        raise ImageDecodeError(f"{name}: not an image format Ascension reads "
                               f"({', '.join(FORMATS)})")
    kind, size = found
    if size is None or size[0] * size[1] == 0:
        raise ImageDecodeError(f"{name}: not a readable image (a damaged {kind} header)")
    if size[0] * size[1] > max_pixels:
        raise ImageDecodeError(
            f"{name}: {size[0]}x{size[1]} pixels is over the limit of {max_pixels:,} "
            "(a decompression bomb?); raise {max_image_pixels} to accept it",
            options=("max_image_pixels",))
    return size


_REDUCED_JPEG_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                       (2, cv2.IMREAD_REDUCED_COLOR_2))


def decode_image(
    data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> np.ndarray:
    """Decode image bytes to 8-bit RGB (H, W, 3).

    JPEG EXIF orientation is honoured; grayscale, RGBA (over white), 16-bit and float images
    become 8-bit RGB. The header's dimensions are read first (``image_header``): more than
    ``max_pixels``, a format without a size reader, or a header that does not parse is refused
    before the decoder allocates anything. ``min_side``: a JPEG
    whose short side is a multiple of it is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself
    (far cheaper than decoding in full and resizing), never below ``min_side``. Raises
    ImageDecodeError for anything that cannot be read.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    size = _checked_size(data, name, max_pixels)
    flags = None
    if min_side and data.startswith(JPEG_MAGIC):
        short = min(size)
        flags = next((flag for factor, flag in _REDUCED_JPEG_FLAGS if short // factor >= min_side),
                     None)
    try:
        return _decode(data, name, flags)
    except cv2.error as exc:  # OpenCV raises on some malformed headers instead of returning None
        reason = str(exc).strip().splitlines()[-1][:120]
        raise ImageDecodeError(f"{name}: not a readable image ({reason})") from None


def _decode(data: bytes, name: str, jpeg_flags: int | None = None) -> np.ndarray:
    buffer = np.frombuffer(data, dtype=np.uint8)
    has_alpha_png = data.startswith(PNG_MAGIC) and len(data) > 25 and data[25] in (4, 6)
    if data.startswith(JPEG_MAGIC):
        # IMREAD_COLOR (and its reduced variants) apply the EXIF orientation and convert CMYK
        # and grayscale JPEGs.
        image = cv2.imdecode(buffer, jpeg_flags or cv2.IMREAD_COLOR)
    elif data.startswith(PNG_MAGIC) and not has_alpha_png:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    else:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageDecodeError(f"{name}: not a readable image (corrupt or unsupported)")
    image = _to_uint8(image)
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    channels = image.shape[2]
    if channels == 2:  # grayscale + alpha
        image = np.concatenate([np.repeat(image[:, :, :1], 3, axis=2), image[:, :, 1:]], axis=2)
        channels = 4
    if channels == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    if channels == 4:
        image = _composite_on_white(image)
    elif channels != 3:
        raise ImageDecodeError(f"{name}: unsupported number of channels ({channels})")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> np.ndarray:
    """Read and decode one file (unicode names included) to 8-bit RGB; see decode_image."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, str(path), max_pixels, min_side)
