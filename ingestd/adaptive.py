"""How many requests one KATO server gets at once: adapted to what it takes (AIMD, as TCP's congestion window).

A server answers 503 past its concurrency limit (uvicorn's ``--limit-concurrency``: 100 per KATO worker, ``/health``
included). Sending as many requests as the pipeline has sessions would turn that limit into a storm of 503s, so
requests wait for a slot here: the number of slots grows by one for every window of answered requests (additive
increase) and halves on a 503 (multiplicative decrease; only refusals of requests sent since the last decrease count,
so one burst halves it once), from 8 (a slow start) between 1 and ``maximum`` (the pipeline's concurrency:
``--workers`` × levels).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class AdaptiveLimit:
    """Slots for requests in flight to one server; ``limit`` adapts between 1 and ``maximum``."""

    def __init__(self, maximum: int, initial: int = 8) -> None:
        self.maximum = max(1, maximum)
        self.limit = float(min(self.maximum, max(1, initial)))
        self.in_flight = 0
        self.decreases = 0  # the limit's epoch: how many times it was halved
        self._freed: asyncio.Condition | None = None

    @property
    def slots(self) -> int:
        return max(1, int(self.limit))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """Hold one of the slots while a request is in flight; yields the limit's epoch it was sent under."""
        if self._freed is None:
            self._freed = asyncio.Condition()
        freed = self._freed
        async with freed:
            await freed.wait_for(lambda: self.in_flight < self.slots)
            self.in_flight += 1
        try:
            yield self.decreases
        finally:
            async with freed:
                self.in_flight -= 1
                freed.notify(max(1, self.slots - self.in_flight))

    def answered(self) -> None:
        """A request was served: one more slot per window of ``limit`` answers."""
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)

    def refused(self, epoch: int) -> None:
        """A 503 to a request sent under ``epoch``: half the slots, once per burst (refusals of requests sent before
        the last decrease say nothing about the limit now)."""
        if epoch != self.decreases:
            return
        self.limit = max(1.0, self.limit / 2)
        self.decreases += 1
