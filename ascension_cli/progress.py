"""The one progress protocol of long work over images (embedding, indexing, searching): how many
images there are, how many are done, which could not be read, and notes along the way. The
command line draws it (``cli/console.py::ImageProgress``); the base class ignores everything."""

from __future__ import annotations

from typing import Any


class Progress:
    """Override what you want to see; every method may be called from the work's thread."""

    def start(self, total: int) -> None:
        """``total`` images are about to be processed."""

    def advance(self, count: int) -> None:
        """``count`` more are done."""

    def failed(self, failure: Any) -> None:
        """One image could not be read (a ``data.dataset.Failed``: its index and reason)."""

    def note(self, text: str) -> None:
        """Something worth telling (a resume, a part embedded again)."""

    def stage(self, description: str) -> Progress:
        """The progress of one stage of the work ("embedding", "searching", ...), which may
        run inside another; by default this same object."""
        return self
