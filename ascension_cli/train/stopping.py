"""SIGINT and SIGTERM during training: stop at once before training starts, else at the next
micro-batch (abandoning a step or a validation) after saving a resumable checkpoint."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, NoReturn

from ascension_cli.errors import Interrupted, Wording, template_of


class StopRequest:
    """SIGINT/SIGTERM. Before training starts (``deferring`` False) the run stops at once: there
    is nothing to save. Once it trains, the signal is noted and the loop stops at the next
    micro-batch, abandoning a step in progress, or after validation, and saves a resumable
    checkpoint first. A second Ctrl-C stops at once (the last checkpoint stays as it was).
    """

    def __init__(self):
        self.signal_number: int | None = None
        self.deferring = False
        self.before = "before training started"  # what was going on, for the message
        self._previous: dict[int, Any] = {}

    @property
    def asked(self) -> bool:
        return self.signal_number is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number
        if not self.deferring:
            before, options = template_of(self.before)
            stopped(number, Wording(f"{before}; files written before stay as they were", options))


def ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides when to stop, and
    # workers dying under it would turn a clean stop into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stopped(signal_number: int | None, what: str) -> NoReturn:
    """Raise ``Interrupted``: "stopped by SIGNAL <what>" (SIGTERM when the signal is unknown)."""
    number = signal_number or signal.SIGTERM
    template, options = template_of(what)
    raise Interrupted(f"stopped by {signal.Signals(number).name} {template}", number, options)


def interrupted(
    signal_number: int | None, checkpoint: Path, epoch: int, step: int, abandoned: str = ""
) -> NoReturn:
    """Raise ``Interrupted`` saying where the run stopped and how to continue it."""
    stopped(signal_number, Wording(
        f"in epoch {epoch} at step {step}; {abandoned}a resumable checkpoint is in "
        f"{checkpoint}: run the same command with {{resume}} auto to continue", ("resume",)))
