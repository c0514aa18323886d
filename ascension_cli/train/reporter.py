"""What the trainer tells the outside world: the ``Reporter`` protocol. The command line draws it
with rich (``cli/console.py``); tests collect it; the base class ignores everything."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ascension_cli.train.logbook import EpochRecord


class Reporter:
    """Progress and messages of a training run. Override what you want to see."""

    def message(self, text: str) -> None: ...

    def table(self, title: str, rows: list[tuple[str, str]]) -> None: ...

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, loss: float, lr: float, images_per_second: float) -> None: ...

    def epoch_end(self, record: EpochRecord) -> None: ...

    def work_start(self, description: str, total: int) -> None:
        """Long preparatory work (such as --cache-images) begins: ``total`` items."""

    def work_advance(self, count: int) -> None: ...

    def work_end(self) -> None: ...
