"""A better model for a catalogue in use: every photo it holds embedded again while the current
model keeps answering, a quality gate on the catalogue's calibration photos, then one atomic
switch (that a running service picks up at its next request); and the way back.

The photos are embedded through the chunked pipeline ``embed`` uses, its parts kept under
``.upgrade/``: an upgrade interrupted part-way continues where it stopped. Before switching,
both models search the calibration photos among their own vectors: Recall@1 of the known
photos and the FNMR at the threshold each model's unknowns give for the calibrated FMR. A model
worse than ``tolerance`` on either is refused (both figures said) unless forced. The new
generation is recalibrated, and keeps the catalog.json it replaced: ``rollback`` writes it back,
its files untouched, until the next change of the catalogue.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ascension_cli.atomic import atomic_write_json, atomic_write_text
from ascension_cli.catalog.calibrate import (
    _query_labels,
    calibration_record,
    labelled_photos,
    measure,
)
from ascension_cli.catalog.folder_store import FolderStore, store_of
from ascension_cli.catalog.history import change, record_pending
from ascension_cli.catalog.milvus_collections import rollback, switch
from ascension_cli.catalog.milvus_shared import refuse_writes_over_http
from ascension_cli.catalog.photos import verified
from ascension_cli.catalog.search import CatalogSearcher
from ascension_cli.catalog.store import Catalog, write_catalog
from ascension_cli.catalog_layout import CATALOG_JSON, catalog_files, is_milvus
from ascension_cli.embedding.pipeline import EmbedOptions, embed_images, embed_source
from ascension_cli.embedding.vectors import sha256_of
from ascension_cli.errors import CatalogError, Refused
from ascension_cli.formats import PARTS_CHUNK
from ascension_cli.model.checkpoint import load_model
from ascension_cli.progress import Progress

UPGRADE_FOLDER = ".upgrade"  # the parts of an upgrade in progress
CHUNK = PARTS_CHUNK  # photos a part holds
TOLERANCE = 0.01  # Recall@1 or FNMR a new model may lose before the gate refuses it
KEPT_OUT = ("rollback", "previous_files", "change")  # not carried into a rollback's record


@dataclass(frozen=True)
class Gate:
    """Both models' figures on the calibration photos, and why the new one is worse (empty:
    it passes)."""

    photos: str
    before: dict
    after: dict
    worse: list[str]

    def to_dict(self) -> dict:
        return {"photos": self.photos, "before": self.before, "after": self.after,
                "worse": self.worse, "passed": not self.worse}


def _photo_files(catalog: Catalog) -> list[Path]:
    """Each photo the catalogue holds, where it is read from; refused when one is missing or no
    longer the photo recorded (a reference whose file changed)."""
    files = [catalog.photo_file(row) for row in range(len(catalog))]
    digests = catalog.digests or [""] * len(catalog)
    checked: dict[Path, bool] = {}
    bad = [str(path) for path, digest in zip(files, digests, strict=True)
           if not checked.setdefault(path, verified(path, digest))]
    if bad:
        raise Refused(f"{len(bad)} of the catalogue's photos are missing or changed (first: "
                      f"{bad[0]}): an upgrade embeds every photo again; remove those first")
    return files


def _work(store, catalog: Catalog) -> Path:
    """Where an upgrade keeps its parts: the catalogue folder's .upgrade/, or in the shared
    store one for each Milvus catalogue."""
    if not is_milvus(store.name):
        return catalog.directory / UPGRADE_FOLDER
    refuse_writes_over_http()
    return catalog.directory / f"{UPGRADE_FOLDER}-{store.location.collection}"


def _embedded_again(catalog: Catalog, checkpoint: Path, files: list[Path], work: Path,
                    progress: Progress | None, embed_options: dict) -> np.ndarray:
    """Every photo's vector under the new model, in the catalogue's order, through the chunked
    pipeline (parts under ``work``, so an interrupted upgrade resumes)."""
    work.mkdir(exist_ok=True)
    unique = sorted({path.resolve().as_posix() for path in files})
    listing = "path,label\n" + "".join(f"{_csv(path)},photo\n" for path in unique)
    manifest = work / "photos.csv"
    if not manifest.is_file() or manifest.read_text(encoding="utf-8") != listing:
        atomic_write_text(manifest, listing)
    options = EmbedOptions.of(feature_kind=catalog.feature_kind, **embed_options)
    found = embed_source(checkpoint, manifest, work / "vectors.npz", options, progress,
                         chunk_size=CHUNK)
    if found.failed:
        raise Refused(f"{len(found.failed)} photo(s) could not be read by the new model "
                      f"(first: {found.failed[0]})")
    by_path = {Path(path).resolve().as_posix(): row for row, path in enumerate(
        _absolute(manifest.parent, found.paths))}
    return found.vectors[[by_path[path.resolve().as_posix()] for path in files]]


def _csv(path: str) -> str:
    with_quotes = path.replace('"', '""')
    return f'"{with_quotes}"'


def _absolute(root: Path, paths: list[str]) -> list[Path]:
    return [Path(path) if Path(path).is_absolute() else root / path for path in paths]


def _gate(catalog: Catalog, new_vectors: np.ndarray, new_model, new_spec, photos: str | None,
          tolerance: float, embed_options: dict) -> tuple[Gate | None, dict | None]:
    """Both models measured on the calibration photos (``photos``, else those the catalogue
    was calibrated on), and the new calibration; (None, None) when there are none to use."""
    source = photos or (catalog.calibration or {}).get("images")
    if source is None or not Path(source).exists():
        return None, None
    target = float((catalog.calibration or {}).get("target_fmr", 0.01))
    scan = labelled_photos(catalog, source)
    old_vectors, indices = CatalogSearcher(catalog).embed(scan.paths, None, **embed_options)
    new_queries, _, new_indices = embed_images(new_model, new_spec, scan.paths, None, None,
                                               feature_kind=catalog.feature_kind,
                                               **embed_options)
    common = np.intersect1d(indices, new_indices)
    old_vectors = old_vectors[np.searchsorted(indices, common)]
    new_queries = new_queries[np.searchsorted(new_indices, common)]
    labels, names, unknown = _query_labels(catalog, scan.classes, scan.labels[common])
    held = [names.index(n) for n in (catalog.calibration or {}).get("unknown_classes", [])
            if n in names]
    unknown = np.union1d(unknown, np.array(held, np.int64))
    if not np.isin(labels, unknown).any():
        return None, None
    before = measure(old_vectors, labels, catalog.with_vectors().vectors, catalog.labels,
                     unknown, names, target)
    after = measure(new_queries, labels, new_vectors, catalog.labels, unknown, names, target)
    worse = []
    if after.figures["recall_at_1_known"] < before.figures["recall_at_1_known"] - tolerance:
        worse.append("Recall@1 of the known photos")
    if after.figures["fnmr"] > before.figures["fnmr"] + tolerance:
        worse.append(f"FNMR at an FMR of {target:g}")
    gate = Gate(str(source), before.figures, after.figures, worse)
    return gate, calibration_record(after, source, len(catalog), [])


def upgrade_catalog(directory: str | Path, checkpoint: str | Path, by: str, force: bool = False,
                    photos: str | None = None, tolerance: float = TOLERANCE,
                    progress: Progress | None = None, **embed_options) -> tuple[Catalog, Gate]:
    """Switch the catalogue in ``directory`` to the model of ``checkpoint`` (see the module
    notes); ``Refused`` names why not, with both figures when the gate refuses."""
    store = store_of(directory)
    stamp, catalog = store.stamp(), store.read()
    new_model, new_spec, _ = load_model(checkpoint)
    sha = sha256_of(checkpoint)
    if sha == catalog.checkpoint_sha256:
        raise Refused("the catalogue already answers with this model")
    work = _work(store, catalog)  # refused first where the shared store is read-only
    files = _photo_files(catalog)
    new_vectors = _embedded_again(catalog, Path(checkpoint), files, work, progress,
                                  embed_options)
    gate, calibration = _gate(catalog, new_vectors, new_model, new_spec, photos, tolerance,
                              embed_options)
    if gate is None and not force:
        raise Refused("nothing to measure the new model on: calibrate the catalogue first "
                      "(`ascension calibrate`), give --photos, or pass --force")
    if gate is not None and gate.worse and not force:
        raise Refused(f"the new model is worse on {' and '.join(gate.worse)} of "
                      f"{gate.photos}: {_figures(gate)}; pass --force to switch anyway")
    upgraded = replace(catalog, vectors=new_vectors, spec=new_spec, checkpoint_sha256=sha,
                       calibration=calibration, calibration_ignored=None)
    entry = change("upgrade", by, len(catalog), len(set(catalog.items())),
                   from_checkpoint=catalog.checkpoint_sha256[:16], to_checkpoint=sha[:16],
                   **({} if gate is None else {"gate": gate.to_dict()}))
    with store.writing():
        if store.stamp() != stamp:
            raise CatalogError("the catalogue changed during the upgrade; run it again (what "
                               "was embedded is reused)")
        if is_milvus(store.name):
            written = switch(store, upgraded, new_model, entry)
        else:
            written = _switch_folder(store, upgraded, new_model, entry)
    shutil.rmtree(work, ignore_errors=True)
    return written, gate


def _switch_folder(store: FolderStore, upgraded: Catalog, model, entry: dict) -> Catalog:
    """The upgraded generation, written with the catalog.json it replaces kept for a
    rollback."""
    live = json.loads((store.directory / CATALOG_JSON).read_text(encoding="utf-8"))
    written = write_catalog(upgraded, model, entry, rollback={
        key: value for key, value in live.items() if key not in KEPT_OUT})
    record_pending(store.directory)
    return written


def _figures(gate: Gate) -> str:
    b, a = gate.before, gate.after
    return (f"Recall@1 {b['recall_at_1_known']:.3f} now, {a['recall_at_1_known']:.3f} new; "
            f"FNMR {b['fnmr']:.3f} now, {a['fnmr']:.3f} new")


def rollback_catalog(directory: str | Path, by: str) -> Catalog:
    """Return the catalogue to the model, vectors and calibration it had before its last
    upgrade, exactly (their files, or its generation's collection, were kept); possible until
    the next change."""
    if is_milvus(directory):
        return rollback(store_of(directory), by)
    store = FolderStore(directory)
    with store.writing():
        path = store.directory / CATALOG_JSON
        live = json.loads(path.read_text(encoding="utf-8"))
        before = live.get("rollback")
        if not isinstance(before, dict):
            raise Refused("nothing to roll back: the catalogue has not been upgraded since its "
                          "last change")
        try:
            catalog_files(before)
        except ValueError:
            raise CatalogError(f"{path}'s rollback record is damaged") from None
        generation = int(live["generation"]) + 1
        items = len(set(store.read(with_vectors=False).items()))  # the upgrade's: the same
        entry = change("rollback", by, int(before.get("count", 0)), items,
                       from_generation=generation - 1, to_generation=generation,
                       to_checkpoint=str(before.get("checkpoint_sha256", ""))[:16])
        atomic_write_json(path, {**before, "generation": generation,
                                 "previous_files": catalog_files(live), "change": entry})
        record_pending(store.directory)
    return store.read(with_vectors=False)
