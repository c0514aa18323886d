"""CSV and Parquet manifests: a table of images (path, label, split, query/gallery roles, item
id) wherever a folder tree is accepted, and the conversion of a folder tree into one."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ascension_cli.data.folder import (
    FolderScan,
    item_in_two_classes,
    scan_folder,
    scan_images,
    stratified_split,
    unusable,
)
from ascension_cli.errors import DataError
from ascension_cli.paths import MANIFEST_SUFFIXES

REQUIRED = ("path", "label")
OPTIONAL = ("split", "is_query", "is_gallery", "item_id")
COLUMNS = REQUIRED + OPTIONAL
SPLITS = ("train", "validation", "test")
_SPLIT_SPELLINGS = {"train": "train", "validation": "validation", "val": "validation",
                    "valid": "validation", "test": "test"}
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}


def is_manifest(path: str | Path) -> bool:
    """A path a manifest reader takes (by its suffix): .csv, .parquet or .pq."""
    return Path(path).suffix.lower() in MANIFEST_SUFFIXES


def _rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """The column names and (line number, row) pairs; a CSV's header is line 1, a Parquet
    table's first row is line 1."""
    if path.suffix.lower() == ".csv":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a UTF-8 CSV file") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            columns = [name.strip() for name in reader.fieldnames or []]
        except csv.Error as exc:
            raise DataError(f"{path} line 1: not a readable CSV header ({exc})") from None
        reader.fieldnames = columns
        return columns, _csv_rows(path, reader)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install "
                        "'ascension-cli[manifest]'") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several kinds for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({str(exc)[:120]})") from None
    data = {name: table.column(name).to_pylist() for name in table.column_names}
    rows = (
        (number + 1, {name: "" if values[number] is None else str(values[number])
                      for name, values in data.items()})
        for number in range(table.num_rows)
    )
    return list(table.column_names), rows


def _csv_rows(path: Path, reader: csv.DictReader) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; a line the csv module cannot parse (a field past its size
    limit, say) stops with its line number."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path} line {reader.line_num + 1}: not a readable CSV line "
                            f"({exc})") from None
        yield reader.line_num, row


def _check_columns(path: Path, columns: list[str]) -> None:
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        raise DataError(f"{path}: no {' or '.join(missing)} column; a manifest needs path and "
                        f"label (and may have {', '.join(OPTIONAL)})")
    unknown = [name for name in columns if name not in COLUMNS]
    if unknown:
        raise DataError(f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; a manifest's "
                        f"columns are {', '.join(COLUMNS)}")
    duplicated = [name for name, count in Counter(columns).items() if count > 1]
    if duplicated:
        raise DataError(f"{path}: column(s) {', '.join(duplicated)} appear more than once")


def _flag(path: Path, line: int, column: str, value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataError(f"{path} line {line}: {column} is {value!r}; write 1/0 or true/false")


def _split(path: Path, line: int, value: str) -> str:
    split = _SPLIT_SPELLINGS.get(value.strip().lower())
    if split is None:
        raise DataError(f"{path} line {line}: split is {value!r}; write train, validation or "
                        "test")
    return split


def read_manifest(path: str | Path, classes: list[str] | None = None) -> FolderScan:
    """The images a manifest lists, with their labels and any split, roles and item ids.

    Rows that cannot be used (missing, empty or non-image file, empty label, a path listed
    again, a label outside ``classes``) are skipped and counted with their line numbers, as a
    folder scan skips files; a problem with the table itself (unknown or missing column, a
    split or flag that is not one) stops with its line number. Classes are the labels in sorted
    order unless ``classes`` fixes them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    root = path.resolve().parent
    columns, rows = _rows(path)
    _check_columns(path, columns)
    skipped: Counter = Counter()
    lines: dict[str, list[int]] = {}

    def skip(reason: str, line: int) -> None:
        skipped[reason] += 1
        lines.setdefault(reason, []).append(line)

    seen: set[Path] = set()
    kept: list[tuple[Path, str, str, bool, bool, str]] = []
    for line, row in rows:
        entry = _entry(path, root, line, row, len(columns), classes)
        if isinstance(entry, str):
            skip(entry, line)
        elif entry[0] in seen:
            skip("path listed again", line)
        else:
            seen.add(entry[0])
            kept.append(entry)
    if not kept:
        raise DataError(f"{path}: no usable rows"
                        + (f" ({_describe(skipped)})" if skipped else " (the table is empty)"))
    names = list(classes) if classes is not None else sorted({row[1] for row in kept})
    position = {label: index for index, label in enumerate(names)}
    # An empty item_id is the default item, the photo's class (as a folder tree gives).
    items = [row[5] or row[1] for row in kept] if "item_id" in columns else None
    clash = None if items is None else item_in_two_classes(items, [row[1] for row in kept])
    if clash is not None:
        raise DataError(f"{path}: item_id {clash[0]!r} is filed under two classes, {clash[1]!r} "
                        f"and {clash[2]!r}; an item is one product of one class: correct the "
                        "item_id or the label")
    return FolderScan(
        root, names, [row[0] for row in kept],
        np.array([position[row[1]] for row in kept], dtype=np.int64), skipped,
        splits=np.array([row[2] for row in kept]) if "split" in columns else None,
        is_query=np.array([row[3] for row in kept]) if "is_query" in columns else None,
        is_gallery=np.array([row[4] for row in kept]) if "is_gallery" in columns else None,
        item_ids=items,
        skipped_lines=lines,
    )


def _entry(path: Path, root: Path, line: int, row: dict, columns: int,
           classes: list[str] | None) -> tuple[Path, str, str, bool, bool, str] | str:
    """One row as (file, label, split, is_query, is_gallery, item id), or why it is skipped;
    a row the table cannot hold (more cells, a bad split or flag) stops with its line."""
    if None in row:  # more cells than columns
        raise DataError(f"{path} line {line}: more cells than the {columns} columns")
    name, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
    split = _split(path, line, row["split"]) if "split" in row else ""
    query = _flag(path, line, "is_query", row["is_query"] or "") if "is_query" in row else False
    gallery = (_flag(path, line, "is_gallery", row["is_gallery"] or "")
               if "is_gallery" in row else False)
    if not name:
        return "empty path"
    if not label:
        return "empty label"
    if classes is not None and label not in classes:
        return "unknown class"
    file = Path(os.path.normpath(name if os.path.isabs(name) else root / name))
    why = unusable(file)
    if why is not None:
        return why
    item = row.get("item_id") or ""  # kept as given; blank means the default, the class
    return file, label, split, query, gallery, item if item.strip() else ""


def _describe(skipped: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))


def scan_source(path: str | Path, classes: list[str] | None = None) -> FolderScan:
    """A class-per-folder tree or a manifest, whichever ``path`` is."""
    return read_manifest(path, classes) if is_manifest(path) else scan_folder(path, classes)


def scan_any(path: str | Path, split: str | None = None) -> FolderScan:
    """Images to embed: a manifest (only ``split``'s rows when given), a class-per-folder tree
    or a flat folder of unlabelled images."""
    if not is_manifest(path):
        if split is not None:
            raise DataError("{split} applies to a manifest (CSV or Parquet), not a folder",
                            options=("split",))
        return scan_images(path)
    scan = read_manifest(path)
    if split is None:
        return scan
    if scan.splits is None:
        raise DataError(f"{{split}} {split}: {path} has no split column", options=("split",))
    chosen = scan.subset(scan.splits == split)
    if not len(chosen):
        raise DataError(f"{path} has no usable rows of split {split!r}")
    return chosen


def for_evaluation(scan: FolderScan) -> FolderScan:
    """The rows an evaluation embeds: those flagged as query or gallery when the manifest has
    the flags (training rows are not), else all."""
    if scan.is_query is None and scan.is_gallery is None:
        return scan
    return scan.subset(role(scan, "query") | role(scan, "gallery"))


def role(scan: FolderScan, which: str) -> np.ndarray:
    """Which images are queries (or gallery items); a manifest with only one of the two columns
    makes every image the other."""
    flags = scan.is_query if which == "query" else scan.is_gallery
    if flags is not None:
        return flags
    return np.ones(len(scan), dtype=bool)


# ---------------------------------------------------------------------------- writing

def manifest_rows(
    root: str | Path, manifest_folder: str | Path, val_fraction: float, test_fraction: float,
    seed: int,
) -> tuple[FolderScan, list[dict[str, str]]]:
    """A folder tree as manifest rows: each image's path (relative to ``manifest_folder``, where
    the manifest will be), label, and a
    seeded per-class split; test images are queries and gallery items (searched among
    themselves), the standard protocol when no separate gallery exists."""
    scan = scan_folder(root)
    split = np.full(len(scan), "train", dtype=object)
    rest, test = stratified_split(scan.labels, test_fraction, seed) if test_fraction else (
        np.arange(len(scan)), np.array([], dtype=np.int64))
    split[test] = "test"
    if val_fraction:
        fraction = val_fraction / max(1e-9, 1 - test_fraction)
        _, val = stratified_split(scan.labels[rest], min(fraction, 0.99), seed + 1)
        split[rest[val]] = "validation"
    base = Path(manifest_folder).resolve()
    rows = [
        {"path": Path(os.path.relpath(scan.paths[i].resolve(), base)).as_posix(),
         "label": scan.classes[scan.labels[i]], "split": split[i],
         "is_query": str(int(split[i] == "test")), "is_gallery": str(int(split[i] == "test"))}
        for i in range(len(scan))
    ]
    return scan, rows


def describe_rows(scan: FolderScan, rows: list[dict[str, str]]) -> str:
    """``40 rows (4 classes; 24 train, 8 validation, 8 test)`` and what was skipped."""
    splits = Counter(row["split"] for row in rows)
    counts = ", ".join(f"{splits[name]} {name}" for name in SPLITS)
    skipped = f"; {scan.skip_summary()}" if scan.skipped else ""
    return f"{len(rows)} rows ({len(scan.classes)} classes; {counts}){skipped}"


def write_manifest(path: str | Path, rows: Iterable[dict[str, str]]) -> None:
    """Write rows as CSV (or Parquet by the suffix), atomically."""
    from ascension_cli.atomic import atomic_write, atomic_write_text

    rows = list(rows)
    path = Path(path)
    columns = [name for name in COLUMNS if rows and name in rows[0]]
    if path.suffix.lower() == ".csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())
        return
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("writing Parquet needs pyarrow: pip install 'ascension-cli[manifest]'; "
                        "or write a .csv") from None
    flags = ("is_query", "is_gallery")
    table = pa.table({
        name: [row[name] in ("1", True) for row in rows] if name in flags
        else [row[name] for row in rows]
        for name in columns
    })
    atomic_write(path, lambda handle: pq.write_table(table, handle))
