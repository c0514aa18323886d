import pytest

from ascension_cli.atomic import atomic_write, atomic_write_text
from ascension_cli.model.checkpoint import atomic_save, load_checkpoint


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "file.txt", "old")

    def full_disk(handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, full_disk)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_interrupted_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from ascension_cli.model import checkpoint

    payload = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "x": 1,
               **dict.fromkeys(checkpoint.REQUIRED_KEYS, {})}
    atomic_save(payload, tmp_path / "last.pt")

    def interrupted(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({**payload, "x": 2}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["x"] == 1


def test_a_written_file_gets_the_usual_mode_not_the_temp_files(tmp_path):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    target = atomic_write(tmp_path / "report.html", lambda handle: handle.write(b"<html>"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
