"""A catalogue maintained in place (`ascension catalog ...` and the service's writing routes):
each change gives the answers of a catalogue built from scratch with the same photos and
labels, is recorded in the history, keeps the photos it holds (and no other), and a snapshot
loads on its own."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from typer.testing import CliRunner

from ascension_cli import api
from ascension_cli.catalog.store import load_catalog
from ascension_cli.cli.app import app
from tests.test_catalog import train_tiny

runner = CliRunner()
pytest.importorskip("fastapi")


def cli(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("changes")
    data, checkpoint = train_tiny(root)
    return data, checkpoint


def build(checkpoint: Path, rows: list[tuple[Path, str, str | None]], folder: Path,
          place=None) -> str:
    """A catalogue built from scratch from ``rows`` (photo, class, item id or None): in
    ``folder``, or at ``place(folder.name)`` (``tests/stores.py``)."""
    manifest = folder.with_suffix(".csv")
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "item_id"])
        for path, label, item in rows:
            writer.writerow([path.resolve().as_posix(), label, item or ""])
    where = str(folder) if place is None else place(folder.name)
    cli("index", checkpoint, manifest, "-o", where, *([] if place is None else place.shared),
        "--workers", "0")
    return where


def answers(catalog: Path, queries: list[Path]) -> list:
    """What a search of ``queries`` answers: each match's photo, class, item and similarity."""
    return [(Path(r.query).name, r.predicted, [
        (m.path, m.class_name, m.item, round(m.similarity, 4)) for m in r.matches])
        for r in api.search(catalog, queries, k=6, workers=0)]


def rows_of(data: Path) -> list[tuple[Path, str, str | None]]:
    return [(path, path.parent.name, None) for path in sorted(data.glob("*/*.png"))]


def photos_on_disk(catalog: Path) -> set[str]:
    return {p.relative_to(catalog).as_posix() for p in (catalog / "photos").rglob("*")
            if p.is_file()}


def photos_kept(catalog: str, place) -> None:
    """A folder catalogue holds the photos it names and no other; a Milvus one's are in the
    shared store (which other catalogues may share: a removed photo stays there)."""
    held = {name for name in load_catalog(catalog).stored if name}
    if place.folder:
        assert photos_on_disk(Path(catalog)) == held
    else:
        assert held <= photos_on_disk(place.root / "shared")


def test_remove_relabel_replace_answer_as_a_catalogue_built_from_scratch(trained, place,
                                                                          tmp_path):
    """Changed in place (in a folder, or in a Milvus collection), then compared with folders
    built from scratch: the same answers, to four decimals."""
    data, checkpoint = trained
    rows = rows_of(data)
    catalog = build(checkpoint, rows, tmp_path / "cat", place)
    queries = [data / "circle" / "001.png", data / "square" / "002.png",
               data / "cross" / "003.png", data / "triangle" / "004.png"]
    photos_kept(catalog, place)  # owned: copied in

    # Remove one photo by its path and a whole item (a class, without item ids).
    path = (data / "circle" / "005.png").resolve().as_posix()
    out = cli("catalog", "remove", catalog, "--photo", path, "--item", "cross")
    assert "removed 9 photo(s) of 2 item(s)" in out, out
    # 006.png is a name three photos have now: only a unique name may stand for a photo.
    out = refused("catalog", "remove", catalog, "--photo", "006.png")
    assert "more than one photo is named '006.png'" in out
    path2 = (data / "square" / "006.png").resolve().as_posix()
    cli("catalog", "remove", catalog, "--photo", path2)
    kept = [r for r in rows if r[1] != "cross"
            and r[0].resolve().as_posix() not in (path, path2)]
    assert answers(catalog, queries) == answers(build(checkpoint, kept, tmp_path / "a"),
                                                queries)
    photos_kept(catalog, place)  # the removed went

    # Relabel: two squares filed as circles, a triangle given an item id of its own.
    squares = [(data / "square" / name).resolve().as_posix() for name in ("001.png", "002.png")]
    cli("catalog", "relabel", catalog, "--photo", squares[0], "--photo", squares[1],
        "--class", "circle")
    triangle = (data / "triangle" / "003.png").resolve().as_posix()
    out = cli("catalog", "relabel", catalog, "--photo", triangle, "--new-item", "tri-3")
    assert "relabelled 1 photo(s) of 1 item(s)" in out
    relabelled = [(p, "circle" if p.resolve().as_posix() in squares else label,
                   "tri-3" if p.resolve().as_posix() == triangle else None)
                  for p, label, _ in kept]
    items = [(p, label, item or label) for p, label, item in relabelled]
    assert answers(catalog, queries) == answers(build(checkpoint, items, tmp_path / "b"),
                                                queries)

    # Replace a photo: same class and item, the new photo's vector.
    new = tmp_path / "new.png"
    shutil.copy(data / "cross" / "007.png", new)
    cli("catalog", "replace", catalog, triangle, new, "--workers", "0")
    replaced = [r for r in items if r[0].resolve().as_posix() != triangle] + [
        (new, "triangle", "tri-3")]
    assert answers(catalog, queries) == answers(build(checkpoint, replaced, tmp_path / "c"),
                                                queries)
    photos_kept(catalog, place)

    # The history: each change, its counts, its generations, who.
    history = api.history(catalog)
    assert [e["action"] for e in history] == ["build", "remove", "remove", "relabel",
                                             "relabel", "replace"]
    if place.folder:  # each change a generation of files (on Milvus: rows changed in place)
        assert [e["to_generation"] for e in history] == [1, 2, 3, 4, 5, 6]
    assert history[1]["photos"] == 9 and history[1]["items"] == 2
    assert all(e["by"].startswith(("user:", "uid:")) for e in history)
    out = cli("catalog", "history", catalog, "--last", "2")
    assert "relabel 1 photo(s) of 1 item(s) (item tri-3)" in out and "replace" in out
    cli("catalog", "remove", catalog, "--photo", "new.png")  # a file name only one photo has
    assert len(load_catalog(catalog)) == len(replaced) - 1


def test_a_relabel_that_files_an_item_under_two_classes_is_refused(trained, place, tmp_path):
    data, checkpoint = trained
    rows = [(p, label, f"{label}-item") for p, label, _ in rows_of(data)]
    catalog = build(checkpoint, rows, tmp_path / "cat", place)
    before = load_catalog(catalog)
    history = len(api.history(catalog))
    one = (data / "circle" / "001.png").resolve().as_posix()
    out = refused("catalog", "relabel", catalog, "--photo", one, "--class", "square")
    assert "would be filed under two classes" in out
    cli("catalog", "relabel", catalog, "--item", "circle-item", "--class", "square")
    after = load_catalog(catalog)
    assert len(api.history(catalog)) == history + 1  # the refused change wrote nothing
    if place.folder:
        assert after.generation == before.generation + 1
    assert {after.class_name(int(label)) for row, label in enumerate(after.labels)
            if after.item(row) == "circle-item"} == {"square"}
    out = refused("catalog", "remove", catalog, "--item", "no-such-item")
    assert "holds no item 'no-such-item'" in out
    out = refused("catalog", "relabel", catalog, "--photo", one)
    assert "--class, --new-item or both" in out


def test_the_suspected_label_errors_of_a_check_are_reviewed_and_applied_in_one_step(
        trained, place, tmp_path):
    data, checkpoint = trained
    # A photo filed under square whose five nearest photos (copies of it) are all circles.
    copies = tmp_path / "copies"
    copies.mkdir()
    for number in range(6):
        shutil.copy(data / "circle" / "001.png", copies / f"copy{number}.png")
    rows = rows_of(data) + [(copies / f"copy{n}.png", "circle", None) for n in range(5)] + [
        (copies / "copy5.png", "square", None)]
    catalog = build(checkpoint, rows, tmp_path / "cat", place)
    cli("index", "--check", "-o", catalog, "--json", tmp_path / "check.json")
    report = json.loads((tmp_path / "check.json").read_text())
    suspected = report["check"]["suspected_label_errors"]
    assert suspected, "the tiny model suspects nothing: the test says nothing"
    out = cli("catalog", "relabel", catalog, "--from", tmp_path / "check.json")
    assert f"relabelled {len(suspected)} photo(s)" in out
    found = load_catalog(catalog)
    for entry in suspected:
        row = found.paths.index(entry["path"])
        assert found.class_name(int(found.labels[row])) == entry["suggested_class"]
    (tmp_path / "bad.json").write_text(json.dumps([{"path": 3}]))
    assert "entry 0" in refused("catalog", "remove", catalog, "--from", tmp_path / "bad.json")


def test_a_snapshot_loads_on_its_own_and_the_catalogue_owns_its_photos(trained, tmp_path):
    data, checkpoint = trained
    source = tmp_path / "photos-in"
    shutil.copytree(data, source)
    catalog = tmp_path / "cat"
    cli("index", checkpoint, source, "-o", catalog, "--workers", "0")
    cli("catalog", "snapshot", catalog, tmp_path / "snap")
    shutil.rmtree(source)  # the shop cleans its folder: the catalogue kept its photos
    moved = tmp_path / "moved"
    shutil.move(catalog, moved)
    snap = load_catalog(tmp_path / "snap")
    assert len(snap) == len(load_catalog(moved)) == 32
    assert all(snap.photo_file(row).is_file() for row in range(len(snap)))
    assert answers(tmp_path / "snap", [data / "circle" / "001.png"]) == answers(
        moved, [data / "circle" / "001.png"])
    assert [e["action"] for e in api.history(tmp_path / "snap")] == ["build"]
    assert "not empty" in refused("catalog", "snapshot", moved, tmp_path / "snap")
    # By reference: no copy, the digest kept.
    cli("index", checkpoint, data, "-o", tmp_path / "ref", "--workers", "0",
        "--photos", "reference")
    referred = load_catalog(tmp_path / "ref")
    assert not (tmp_path / "ref" / "photos").exists() and set(referred.stored) == {""}
    assert all(len(d) == 64 for d in referred.digests)


def test_an_older_catalogue_without_kept_photos_still_loads_and_changes(trained, tmp_path):
    data, checkpoint = trained
    catalog = tmp_path / "cat"
    cli("index", checkpoint, data, "-o", catalog, "--workers", "0", "--photos", "reference")
    # As a catalogue from before: its items file without stored names or digests.
    meta = json.loads((catalog / "catalog.json").read_text())
    items = catalog / meta["files"]["items"]
    with np.load(items) as arrays:
        kept = {k: arrays[k] for k in arrays.files
                if not k.startswith(("stored", "digests"))}
    np.savez(items, **kept)
    old = load_catalog(catalog)
    assert old.stored is None and old.digests is None
    cli("catalog", "remove", catalog, "--item", "cross")
    assert len(load_catalog(catalog)) == 24


def post_json(server, route: str, body: dict, token: str = "a-long-enough-secret"):
    return requests.post(server.url + route, json=body, timeout=60,
                         headers={"Authorization": f"Bearer {token}"})


def test_the_service_changes_items_in_place_behind_the_token(trained, place, tmp_path):
    from tests.test_serve import Server, post

    data, checkpoint = trained
    rows = rows_of(data)
    catalog = build(checkpoint, rows, tmp_path / "cat", place)
    twin = build(checkpoint, rows, tmp_path / "twin")  # changed through the command line
    server = Server(catalog, token="a-long-enough-secret", token_name="till-3")
    try:
        body = {"photos": ["001.png"]}
        assert post_json(server, "/items/remove", body, token="wrong-token-x").status_code == 401
        assert post_json(server, "/items/remove", body).status_code == 409  # four are named so
        assert post_json(server, "/items/remove", {"items": ["nothing"]}).status_code == 404
        assert post_json(server, "/items/remove", {}).status_code == 400
        assert post_json(server, "/items/remove", {"photos": [1]}).status_code == 400
        assert post_json(server, "/items/relabel", {"items": ["cross"]}).status_code == 400
        assert post_json(server, "/items/relabel", {"items": ["cross"], "class": "a/b"}
                         ).status_code == 400
        square = (data / "square" / "003.png").resolve().as_posix()
        answer = post_json(server, "/items/remove", {"items": ["cross"], "photos": [square]})
        assert answer.status_code == 200 and answer.json()["photos"] == 9, answer.text
        answer = post_json(server, "/items/relabel", {"items": ["triangle"], "class": "circle"})
        assert answer.status_code == 200 and answer.json()["items"] == 1
        new = (data / "cross" / "002.png").read_bytes()
        circle = (data / "circle" / "004.png").resolve().as_posix()
        answer = requests.post(server.url + "/items/replace", data={"photo": circle},
                               files=[("image", ("n.png", new))], timeout=60,
                               headers={"Authorization": "Bearer a-long-enough-secret"})
        assert answer.status_code == 200, answer.text
        found = post(server, data / "cross" / "002.png", k="1").json()["results"][0]
        assert found["predicted"] == "circle" and found["matches"][0]["similarity"] > 0.999
        info = requests.get(server.url + "/info", timeout=10).json()
        assert info["history"]["changes"] == 4
        assert info["history"]["last"][0]["action"] == "replace"
        assert info["history"]["last"][0]["by"] == "token:till-3"
        assert requests.get(server.url + "/history?last=2", timeout=10).json()["changes"] == 4
        schema = requests.get(server.url + "/openapi.json", timeout=10).json()
        assert "/items/remove" in schema["paths"] and "/items/relabel" in schema["paths"]
    finally:
        server.stop()
    cli("catalog", "remove", twin, "--item", "cross", "--photo", square)
    cli("catalog", "relabel", twin, "--item", "triangle", "--class", "circle")
    queries = [data / "circle" / "001.png", data / "triangle" / "002.png"]
    served = answers(catalog, queries)
    assert [a[:2] for a in served] == [a[:2] for a in answers(twin, queries)]
    photos_kept(catalog, place)


def test_a_service_given_its_folder_as_text_clears_an_interrupted_add(trained, tmp_path):
    """The service's catalogue named by a string, as the Python API may name it: an add a kill
    interrupted (a photo under uploads/ the catalogue does not hold) is cleared at start."""
    from ascension_cli.serve.lookup import Lookup

    data, checkpoint = trained
    catalog = build(checkpoint, rows_of(data), tmp_path / "cat")
    orphan = Path(catalog) / "uploads" / "circle" / f"{'a' * 32}.png"
    orphan.parent.mkdir(parents=True)
    shutil.copy(data / "circle" / "001.png", orphan)
    lookup = Lookup(str(catalog), {"workers": 0, "device": "cpu", "precision": "auto",
                                   "channels_last": True, "batch_size": 64}, 100_000_000)
    assert isinstance(lookup.directory, Path) and not orphan.exists()
