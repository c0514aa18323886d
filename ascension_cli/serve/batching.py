"""Request batching: searches that arrive together are embedded as one batch, in a worker
thread, each request answered on its own terms; a failing batch is retried a request at a time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ascension_cli.serve.lookup import Lookup, Upload



@dataclass
class Pending:
    """One request's images, waiting for the next batch."""

    images: list[Upload]
    k: int
    threshold: float | None
    group_by: str = "photo"
    # The threshold its search applied: its own, else the catalogue's calibrated one of the
    # moment (set by ``Lookup.search``, so the answer names the one that decided).
    applied: float | None = None
    queued: float = field(default_factory=time.perf_counter)
    done: asyncio.Future | None = None


class Batcher:
    """Collects requests for up to ``window`` seconds (or ``max_images``), then runs one batch in
    a worker thread; each request's future gets its own results."""

    def __init__(self, lookup: Lookup, window: float, max_images: int):
        self.lookup, self.window, self.max_images = lookup, window, max_images
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def submit(self, pending: Pending) -> tuple[list[dict], float]:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
        pending.done = asyncio.get_running_loop().create_future()
        await self.queue.put(pending)
        results, started = await pending.done
        return results, started - pending.queued

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.perf_counter() + self.window
            while sum(len(p.images) for p in batch) < self.max_images:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            started = time.perf_counter()
            await self._answer(batch, started)

    async def _answer(self, batch: list[Pending], started: float) -> None:
        """Answer a batch with one forward pass; if it fails, each request alone, so one bad
        request fails only itself."""
        try:
            answers = await asyncio.to_thread(self.lookup.search, batch)
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear of it
            if len(batch) > 1:
                for pending in batch:
                    await self._answer([pending], started)
                return
            batch[0].done.set_exception(exc)
            return
        for pending, results in zip(batch, answers, strict=True):
            pending.done.set_result((results, started))
