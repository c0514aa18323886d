"""``ascension catalog``: maintaining a catalogue in place, as ``git remote add/remove`` does
for remotes. Each command parses its options (``config/changes.py``), calls its API function
(``api/changes.py``) and prints what the change touched; ``index``, ``search``, ``calibrate``
and ``serve`` stay where they were."""

from __future__ import annotations

from typing import Any

import typer

from ascension_cli.cli import console as out
from ascension_cli.cli.console import ImageProgress, say, shown
from ascension_cli.cli.guard import user_errors
from ascension_cli.cli.options import given, options_of
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

catalog_app = typer.Typer(
    name="catalog", no_args_is_help=True, rich_markup_mode="rich",
    help="Maintain a catalogue in place: remove, relabel and replace photos and items, "
    "upgrade its model behind a quality gate and roll it back, read its history, take a "
    "snapshot. Every change is one atomic step, recorded in the history.")


def _changed(verb: str, changed, json_file=None) -> None:
    catalog = changed.catalog
    say(f"{verb} {changed.photos} photo(s) of {changed.items} item(s); the catalogue holds "
        f"{len(catalog)} photos in {len(catalog.class_names)} classes (generation "
        f"{catalog.generation})")
    confusable = [entry for entry in changed.nearest if entry["confusable"]]
    limit = ("the calibrated threshold" if catalog.threshold is not None
             else "0.9 (uncalibrated)")
    out.print_onboarding(confusable, limit)
    if catalog.calibration_note() is not None:
        say(f"note: {catalog.calibration_note()}")
    if json_file is not None:
        say(f"written to {json_file}")


@catalog_app.command(no_args_is_help=True)
@options_of(RemoveConfig)
def remove(**options: Any) -> None:
    """Take photos, or whole items, out of the catalogue (their kept photos go too)."""
    with user_errors():
        settings = resolve(RemoveConfig, given(options))
        from ascension_cli.api.changes import run_remove

        _changed("removed", run_remove(settings), settings.json_file)


@catalog_app.command(no_args_is_help=True)
@options_of(RelabelConfig)
def relabel(**options: Any) -> None:
    """File photos or whole items under another class and/or item id.

    Warns, as an add does, of an item now as similar to another class's as the threshold.
    """
    with user_errors():
        settings = resolve(RelabelConfig, given(options))
        from ascension_cli.api.changes import run_relabel

        _changed("relabelled", run_relabel(settings), settings.json_file)


@catalog_app.command(no_args_is_help=True)
@options_of(ReplaceConfig)
def replace(**options: Any) -> None:
    """Put a new photo in place of one the catalogue holds: the same class and item."""
    with user_errors():
        settings = resolve(ReplaceConfig, given(options))
        from ascension_cli.api.changes import run_replace

        with ImageProgress("embedding"):
            changed = run_replace(settings)
        _changed("replaced", changed)


@catalog_app.command(no_args_is_help=True)
@options_of(HistoryConfig)
def history(**options: Any) -> None:
    """Every change made to the catalogue: what, how many photos and items, when, by whom."""
    with user_errors():
        settings = resolve(HistoryConfig, given(options))
        from ascension_cli.api.changes import run_history

        entries = run_history(settings)
        if not entries:
            say("no changes recorded (a catalogue built before the history was kept)")
        for entry in entries:
            detail = ", ".join(f"{key} {shown(entry[key])}" for key in ("class", "item")
                               if key in entry)
            generation = ("" if entry.get("to_generation") is None  # a folder's changes
                          else f"generation {entry['to_generation']}  ")
            say(f"{shown(entry.get('at'))}  {generation}"
                f"{shown(entry.get('action'))} {entry.get('photos')} photo(s) of "
                f"{entry.get('items')} item(s)" + (f" ({detail})" if detail else "")
                + f"  by {shown(entry.get('by'))}")
        if settings.json_file is not None:
            say(f"history written to {settings.json_file}")


@catalog_app.command(no_args_is_help=True)
@options_of(SnapshotConfig)
def snapshot(**options: Any) -> None:
    """Copy the catalogue, as it is now, into a new folder that loads on its own.

    A running service keeps answering meanwhile; changes wait until the copy is taken.
    """
    with user_errors():
        settings = resolve(SnapshotConfig, given(options))
        from ascension_cli.api.changes import run_snapshot

        say(f"snapshot written to {run_snapshot(settings)}")


def _gate_lines(gate) -> None:
    if gate is None:
        say("no calibration photos to measure on: switched without a gate (--force)")
        return
    for name, figures in (("current model", gate.before), ("new model", gate.after)):
        say(f"{name}: Recall@1 of the known photos {figures['recall_at_1_known']:.3f}, FNMR "
            f"{figures['fnmr']:.3f} at its threshold {figures['threshold']:.3f}")
    if gate.worse:
        say(f"warning: the new model is worse on {' and '.join(gate.worse)} (--force)")


@catalog_app.command(no_args_is_help=True)
@options_of(UpgradeConfig)
def upgrade(**options: Any) -> None:
    """Switch the catalogue to a new model, behind a quality gate.

    Every photo is embedded again while the current model keeps answering (an interrupted
    upgrade resumes); both models are measured on the calibration photos and a worse one is
    refused; the catalogue is recalibrated and switched at once. `rollback` goes back.
    """
    with user_errors():
        settings = resolve(UpgradeConfig, given(options))
        from ascension_cli.api.changes import run_upgrade

        with ImageProgress("embedding again") as progress:
            catalog, gate = run_upgrade(settings, progress)
        _gate_lines(gate)
        say(f"upgraded: the catalogue answers with {shown(catalog.spec.name)} (generation "
            f"{catalog.generation}); `ascension catalog rollback` returns to the previous one")


@catalog_app.command(no_args_is_help=True)
@options_of(RollbackConfig)
def rollback(**options: Any) -> None:
    """Return the catalogue to the model, vectors and calibration of before its last upgrade."""
    with user_errors():
        settings = resolve(RollbackConfig, given(options))
        from ascension_cli.api.changes import run_rollback

        catalog = run_rollback(settings)
        say(f"rolled back: the catalogue answers with {shown(catalog.spec.name)} again "
            f"(generation {catalog.generation})")
