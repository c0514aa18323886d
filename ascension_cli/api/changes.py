"""Maintaining a catalogue in place from Python, as ``ascension catalog`` does: remove,
relabel and replace photos and items, read the history, take a snapshot (the command line
calls the ``run_*`` functions). Each change goes through the catalogue's store
(``catalog/folder_store.py``) and is recorded in its history as this machine's user."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascension_cli.config import resolve
from ascension_cli.config.changes import (
    HistoryConfig,
    RelabelConfig,
    RemoveConfig,
    ReplaceConfig,
    RollbackConfig,
    SnapshotConfig,
    UpgradeConfig,
)

if TYPE_CHECKING:
    from ascension_cli.catalog.edit import Relabel
    from ascension_cli.catalog.folder_store import Changed
    from ascension_cli.catalog.store import Catalog
    from ascension_cli.catalog.upgrade import Gate
    from ascension_cli.progress import Progress


def _changes(settings: RemoveConfig | RelabelConfig) -> list[Relabel]:
    """What the options name: the --photo and --item given (with the relabel's new class and
    item), then the entries of --from."""
    from ascension_cli.catalog.edit import Relabel, Selection, read_changes

    changes = []
    if settings.photos or settings.items:
        changes.append(Relabel(Selection(tuple(settings.photos), tuple(settings.items)),
                               getattr(settings, "class_name", None),
                               getattr(settings, "new_item", None)))
    if settings.from_file is not None:
        changes += read_changes(settings.from_file)
    return changes


def _written(settings, changed: Changed) -> Changed:
    if settings.json_file is not None:
        from ascension_cli.retrieval.report import write_json

        write_json(settings.json_file, changed.to_dict())
    return changed


def run_remove(settings: RemoveConfig) -> Changed:
    from ascension_cli.catalog.edit import Selection
    from ascension_cli.catalog.folder_store import store_of
    from ascension_cli.catalog.history import local_user

    chosen = [change.selection for change in _changes(settings)]
    selection = Selection(tuple(p for s in chosen for p in s.photos),
                          tuple(i for s in chosen for i in s.items))
    return _written(settings, store_of(settings.catalog).remove(selection, local_user()))


def run_relabel(settings: RelabelConfig) -> Changed:
    from ascension_cli.catalog.folder_store import store_of
    from ascension_cli.catalog.history import local_user

    return _written(settings, store_of(settings.catalog).relabel(_changes(settings),
                                                                 local_user()))


def run_replace(settings: ReplaceConfig) -> Changed:
    from ascension_cli.catalog.folder_store import store_of
    from ascension_cli.catalog.history import local_user

    return store_of(settings.catalog).replace(settings.photo, settings.new_photo, local_user(),
                                              **settings.run_options())


def run_history(settings: HistoryConfig) -> list[dict]:
    from ascension_cli.catalog.folder_store import store_of

    entries = store_of(settings.catalog).history()
    if settings.json_file is not None:
        from ascension_cli.retrieval.report import write_json

        write_json(settings.json_file, {"changes": entries})
    return entries[-settings.last:]


def run_snapshot(settings: SnapshotConfig) -> Path:
    from ascension_cli.catalog.folder_store import store_of

    return store_of(settings.catalog).snapshot(settings.destination)


def remove(catalog: str | Path, photos: list[str] = (), items: list[str] = (),
           **options: Any) -> Changed:
    """Remove photos (by path or file name) and whole items; ``options``: from_file,
    json_file."""
    return run_remove(resolve(RemoveConfig, dict(options, catalog=catalog, photos=list(photos),
                                                 items=list(items))))


def relabel(catalog: str | Path, photos: list[str] = (), items: list[str] = (),
            class_name: str | None = None, new_item: str | None = None,
            **options: Any) -> Changed:
    """File photos or items under ``class_name`` and/or ``new_item``; ``options``: from_file,
    json_file."""
    return run_relabel(resolve(RelabelConfig, dict(
        options, catalog=catalog, photos=list(photos), items=list(items),
        **({} if class_name is None else {"class_name": class_name}),
        **({} if new_item is None else {"new_item": new_item}))))


def replace(catalog: str | Path, photo: str, new_photo: str | Path, **options: Any) -> Changed:
    """Put ``new_photo`` in place of ``photo`` (same class and item)."""
    return run_replace(resolve(ReplaceConfig, dict(options, catalog=catalog, photo=photo,
                                                   new_photo=new_photo)))


def history(catalog: str | Path, **options: Any) -> list[dict]:
    """The catalogue's latest changes (``last``, default 20), oldest first."""
    return run_history(resolve(HistoryConfig, dict(options, catalog=catalog)))


def snapshot(catalog: str | Path, destination: str | Path) -> Path:
    """A copy of the catalogue that loads on its own, taken while it may be serving."""
    return run_snapshot(resolve(SnapshotConfig, {"catalog": catalog,
                                                 "destination": destination}))


def run_upgrade(settings: UpgradeConfig, progress: Progress | None = None
                ) -> tuple[Catalog, Gate | None]:
    from ascension_cli.catalog.history import local_user
    from ascension_cli.catalog.upgrade import upgrade_catalog

    catalog, gate = upgrade_catalog(
        settings.catalog, settings.checkpoint, local_user(), force=settings.force,
        photos=None if settings.gate_photos is None else str(settings.gate_photos),
        tolerance=settings.tolerance, progress=progress, **settings.run_options())
    if settings.json_file is not None:
        from ascension_cli.retrieval.report import write_json

        write_json(settings.json_file, {"gate": None if gate is None else gate.to_dict(),
                                        "generation": catalog.generation})
    return catalog, gate


def run_rollback(settings: RollbackConfig) -> Catalog:
    from ascension_cli.catalog.history import local_user
    from ascension_cli.catalog.upgrade import rollback_catalog

    return rollback_catalog(settings.catalog, local_user())


def upgrade(catalog: str | Path, checkpoint: str | Path, progress: Progress | None = None,
            **options: Any) -> tuple[Catalog, Gate | None]:
    """Switch the catalogue to ``checkpoint``'s model behind a quality gate; ``options``:
    gate_photos, tolerance, force, json_file, batch_size, precision, workers, device,
    channels_last."""
    return run_upgrade(resolve(UpgradeConfig, dict(options, catalog=catalog,
                                                   checkpoint=checkpoint)), progress)


def rollback(catalog: str | Path) -> Catalog:
    """Return the catalogue to its model and vectors before its last upgrade."""
    return run_rollback(resolve(RollbackConfig, {"catalog": catalog}))
