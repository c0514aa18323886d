"""Changing a catalogue's photos: appending them, choosing which a change touches (photos by
their path or file name, whole items by id), and the catalogue without them or relabelled.
Small functions from one ``Catalog`` to another; ``catalog/folder_store.py`` commits the
result as a new generation."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ascension_cli.catalog.store import Catalog
from ascension_cli.data.folder import item_in_two_classes
from ascension_cli.errors import DataError, ItemClash, NotInCatalog, Refused

SHOWN = 5  # names listed in an error, at most


@dataclass(frozen=True)
class Selection:
    """What a change touches: photos (a path as the catalogue records it, or a file name that
    only one of its photos has) and whole items (by id)."""

    photos: tuple[str, ...] = ()
    items: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.photos or self.items)


@dataclass(frozen=True)
class Relabel:
    """One relabel: the photos or items it names, their new class and/or item id (neither:
    an entry of a list of photos to remove)."""

    selection: Selection
    class_name: str | None = None
    item_id: str | None = None


MAX_CHANGES_BYTES = 256 << 20  # a changes file read whole
MAX_TEXT = 1024  # characters of a path, item id or class a changes file may give


def _text(entry: dict, *keys: str) -> str | None:
    """The first of ``keys`` the entry gives, which must be text."""
    for key in keys:
        value = entry.get(key)
        if value is not None:
            if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
                raise ValueError(f"{key!r} must be text of 1 to {MAX_TEXT} characters")
            return value
    return None


def _entry(entry: Any, check_report: bool) -> Relabel:
    if not isinstance(entry, dict):
        raise ValueError("each entry must be an object naming a photo ('path') or an item")
    photo = _text(entry, "path", "photo")
    item = None if photo is not None else _text(entry, "item")
    if photo is None and item is None:
        raise ValueError("each entry must name a photo ('path') or an item ('item')")
    selection = Selection((photo,) if photo else (), (item,) if item else ())
    if check_report:  # an index --check report: its "class" is the photo's class now
        return Relabel(selection, _text(entry, "suggested_class"))
    return Relabel(selection, _text(entry, "class", "new_class"), _text(entry, "new_item"))


def read_changes(path: Path) -> list[Relabel]:
    """The changes a JSON file lists (see ``config/changes.py``'s --from help); ``DataError``
    says what is wrong with it, and where."""
    try:
        if path.stat().st_size > MAX_CHANGES_BYTES:
            raise ValueError(f"larger than {MAX_CHANGES_BYTES >> 20} MB")
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("check"), dict):
            data = data["check"]  # the whole of index --check --json
        check_report = isinstance(data, dict) and "suspected_label_errors" in data
        entries = (data["suspected_label_errors"] if check_report
                   else data.get("changes") if isinstance(data, dict) else data)
        if not isinstance(entries, list):
            raise ValueError("not a list of changes")
        changes = []
        for number, entry in enumerate(entries):
            try:
                changes.append(_entry(entry, check_report))
            except ValueError as exc:
                raise ValueError(f"entry {number}: {exc}") from None
        return changes
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    except ValueError as exc:  # json's errors too
        raise DataError(f"{path}: not a list of changes: {str(exc)[:200]}") from None


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(name[:80]) for name in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _photo_rows(catalog: Catalog, photos: tuple[str, ...]) -> set[int]:
    by_path: dict[str, list[int]] = {}
    by_name: dict[str, list[int]] = {}
    for row, path in enumerate(catalog.paths):
        by_path.setdefault(path, []).append(row)
        by_name.setdefault(Path(path).name, []).append(row)
    rows: set[int] = set()
    missing, ambiguous = [], []
    for photo in photos:
        found = by_path.get(photo) or by_name.get(photo)
        if not found:
            missing.append(photo)
        elif photo not in by_path and len({catalog.paths[row] for row in found}) > 1:
            ambiguous.append(photo)
        else:
            rows.update(found)
    if missing:
        raise NotInCatalog(f"the catalogue holds no photo {_listed(missing)} (give a path as "
                           "`search` shows it, or a file name only one photo has)")
    if ambiguous:
        raise Refused(f"more than one photo is named {_listed(ambiguous)}: give the path "
                        "as `search` shows it")
    return rows


def selected_rows(catalog: Catalog, selection: Selection) -> np.ndarray:
    """The rows ``selection`` names, in order; ``NotInCatalog`` names what the catalogue lacks,
    ``Ambiguous`` a file name several photos have."""
    rows = _photo_rows(catalog, selection.photos)
    if selection.items:
        items = catalog.items()
        wanted = set(selection.items)
        missing = sorted(wanted - set(items))
        if missing:
            raise NotInCatalog(f"the catalogue holds no item {_listed(missing)}")
        rows.update(row for row, item in enumerate(items) if item in wanted)
    return np.array(sorted(rows), np.int64)


def _rows_kept(values: list | None, keep: np.ndarray) -> list | None:
    return None if values is None else [values[row] for row in np.flatnonzero(keep)]


def without_rows(catalog: Catalog, rows: np.ndarray) -> Catalog:
    """``catalog`` without the photos at ``rows`` (its class names stay, so labels keep their
    numbers)."""
    keep = np.ones(len(catalog), bool)
    keep[rows] = False
    held = catalog.with_vectors()
    return replace(held, vectors=held.vectors[keep], labels=catalog.labels[keep],
                   paths=_rows_kept(catalog.paths, keep),
                   item_ids=_rows_kept(catalog.item_ids, keep),
                   stored=_rows_kept(catalog.stored, keep),
                   digests=_rows_kept(catalog.digests, keep))


def relabelled(catalog: Catalog, changes: list[Relabel]) -> tuple[Catalog, np.ndarray]:
    """``catalog`` with each change's photos filed under its class (added to the classes if
    new) and/or shown as its item, and the rows changed; ``ItemClash`` when an item would end
    under two classes. The photos are chosen in the catalogue as it was."""
    names, labels = list(catalog.class_names), catalog.labels.copy()
    item_ids = None if catalog.item_ids is None else list(catalog.item_ids)
    touched = []
    for change in changes:
        rows = selected_rows(catalog, change.selection)
        touched.append(rows)
        if change.class_name is not None:
            if change.class_name not in names:
                names.append(change.class_name)
            if item_ids is not None and change.item_id is None:
                for row in rows:  # an item that was its class (a blank item id) follows it
                    if item_ids[row] == names[labels[row]]:
                        item_ids[row] = change.class_name
            labels[rows] = names.index(change.class_name)
        if change.item_id is not None:
            item_ids = item_ids if item_ids is not None else catalog.items()
            for row in rows:
                item_ids[row] = change.item_id
    changed = replace(catalog, class_names=names, labels=labels, item_ids=item_ids)
    _refuse_clash(changed)
    return changed, np.unique(np.concatenate(touched)) if touched else np.zeros(0, np.int64)


def _refuse_clash(catalog: Catalog) -> None:
    """Refuse a catalogue that files one item under two classes (without item ids each photo's
    item is its class: nothing can clash, and no pass is made over every photo)."""
    clash = None if catalog.item_ids is None else item_in_two_classes(
        catalog.item_ids, [catalog.class_name(int(label)) for label in catalog.labels])
    if clash is not None:
        raise ItemClash(f"item {clash[0]!r} would be filed under two classes, {clash[1]!r} "
                        f"and {clash[2]!r}: an item is one product of one class; give another "
                        "item id or class, or change the whole item")


def _kept_lists(catalog: Catalog, kept: tuple[list[str], list[str]] | None,
                added: int) -> dict[str, list[str] | None]:
    """The ``stored`` and ``digests`` lists after appending ``added`` photos (``kept`` None:
    referred to, unverified, as before catalogues kept photos)."""
    if catalog.stored is None and kept is None:
        return {"stored": None, "digests": None}
    stored = catalog.stored if catalog.stored is not None else [""] * len(catalog)
    digests = catalog.digests if catalog.digests is not None else [""] * len(catalog)
    new_stored, new_digests = kept if kept is not None else ([""] * added, [""] * added)
    return {"stored": stored + list(new_stored), "digests": digests + list(new_digests)}


def append_items(catalog: Catalog, vectors: np.ndarray, class_names: list[str | None],
                 paths: list[Path], classes: list[str] = (),
                 item_ids: list[str] | None = None,
                 kept: tuple[list[str], list[str]] | None = None) -> Catalog:
    """``catalog`` with photos appended: their vectors, class names (None: unlabelled), paths,
    items (None: each photo's default, its class) and where the catalogue keeps them with their
    digests (``kept``, from ``photos.keep_files``). Class names it lacks (``classes`` first, in
    their order) are added at the end."""
    names = list(catalog.class_names)
    for name in [*classes, *class_names]:
        if name is not None and name not in names:
            names.append(name)
    position = {name: label for label, name in enumerate(names)}
    labels = np.array([-1 if name is None else position[name] for name in class_names],
                      np.int64)
    held = catalog.with_vectors().vectors
    added = [Path(path).resolve().as_posix() for path in paths]
    grown = replace(
        catalog, class_names=names,
        vectors=vectors if len(catalog) == 0 else np.concatenate([held, vectors]),
        labels=np.concatenate([catalog.labels, labels]), paths=catalog.paths + added,
        item_ids=None if catalog.item_ids is None and item_ids is None else catalog.items() + (
            item_ids or [name or path for name, path in zip(class_names, added, strict=True)]),
        **_kept_lists(catalog, kept, len(added)))
    # Without item ids each photo's item is its class: nothing can clash (no pass over every
    # photo on each add to a folder-built catalogue).
    _refuse_clash(grown)
    return grown
