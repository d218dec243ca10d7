"""A bound on the image pixels being decoded at once, server-wide, and memory handed back after a flood.

Bytes in flight are bounded by the admission budget (rpc.Admission), but bytes say
little about memory here: a PNG of a megabyte or two may decode to 64 megapixels,
which Pillow holds at 4 bytes a pixel, plus the converted and resized copies
(benchmarks/README.md, "Red-team run, round 3", has the figures). Each image reserves its pixel count (read
from its header) before it is decoded and waits while the reservations of others
would pass the budget; one image alone is always let through (the per-request pixel
limit bounds it).

glibc keeps what such decodes freed in its heaps for the next request (see
zspace.memory): right for a steady load of small requests, wasteful after a burst
of huge images. When the last decode of a burst ends, the freed pages go back to the
kernel (malloc_trim).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from contextlib import asynccontextmanager

from zspace.memory import release_freed_memory

TRIM_AFTER_PIXELS = 16_000_000  # a burst smaller than this leaves little to hand back


class PixelBudget:
    """Pixels being decoded, bounded by `limit`; only the event loop's thread touches it."""

    def __init__(self, limit: int, trim_after_s: float = 1.0):
        self.limit, self.in_flight, self.peak, self.since_trim = limit, 0, 0, 0
        self.waiting, self.trim_after_s = 0, trim_after_s
        self._changed = asyncio.Condition()
        self._trim_timer: asyncio.TimerHandle | None = None

    @asynccontextmanager
    async def reserve(self, pixels: int):
        """Hold `pixels` of the budget while the body decodes; wait (cancellable: a deadline ends the wait)
        while they would not fit beside the others'."""
        async with self._changed:
            self.waiting += 1
            try:
                await self._changed.wait_for(lambda: not self.in_flight or self.in_flight + pixels <= self.limit)
            finally:
                self.waiting -= 1
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= pixels
            self.since_trim += pixels
            if not self.in_flight and self.since_trim >= TRIM_AFTER_PIXELS and self._trim_timer is None:
                self._trim_timer = asyncio.get_running_loop().call_later(self.trim_after_s, self._trim_if_idle)
            async with self._changed:
                self._changed.notify_all()

    def _trim_if_idle(self) -> None:
        """The burst is over when nothing has been decoded or waited for since the timer was set: hand the
        memory back then, in a thread of its own (malloc_trim takes milliseconds and the heaps' locks; not
        between two images of a flood, and not in a pool whose threads serve requests)."""
        self._trim_timer = None
        if self.in_flight or self.waiting:
            return  # still busy: the end of this decoding sets the timer again
        self.since_trim = 0
        threading.Thread(target=release_freed_memory, name="malloc-trim", daemon=True).start()


_BUDGETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PixelBudget] = weakref.WeakKeyDictionary()


def pixel_budget(limit: int) -> PixelBudget:
    """The running event loop's budget (one per server: tests and quickstart run servers on several loops)."""
    loop = asyncio.get_running_loop()
    budget = _BUDGETS.get(loop)
    if budget is None or budget.limit != limit:
        budget = _BUDGETS[loop] = PixelBudget(limit)
    return budget
