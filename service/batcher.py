"""Dynamic batching: merge concurrent small requests into one ONNX Runtime call.

One batcher per model graph. Requests queue as row blocks; a single worker
takes rows until `max_batch` rows or `max_delay_s` after the oldest waiting
request, runs the graph once in a thread (ONNX Runtime releases the GIL),
and splits the outputs back. Since one batch runs at a time, requests that
arrive during a run form the next batch: with max_delay_s = 0 (the default)
an idle server answers at once and a busy one batches by itself. The queue is bounded in rows: beyond it a
request is refused at once (RESOURCE_EXHAUSTED) instead of waiting forever.
A request cancelled while queued (deadline, client gone) is skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

RunFn = Callable[[np.ndarray], list[np.ndarray]]


class QueueFull(Exception):
    """The batcher's queue holds its maximum number of rows."""


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(self, run: RunFn, executor: Executor, max_batch: int = 64, max_delay_s: float = 0.0,
                 max_queue_rows: int = 4096, on_batch: Callable[[int, float], None] | None = None,
                 inline_rows: int = 64):
        self.run, self.executor, self.inline_rows = run, executor, inline_rows
        self.max_batch, self.max_delay_s, self.max_queue_rows = max_batch, max_delay_s, max_queue_rows
        self.on_batch = on_batch or (lambda rows, queued_s: None)
        self.queue: deque[_Item] = deque()
        self.queued_rows = 0
        self.wakeup = asyncio.Event()
        self.worker: asyncio.Task | None = None
        self.closed = False

    async def submit(self, x: np.ndarray) -> list[np.ndarray]:
        """Run the graph on x's rows, merged with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        n = len(x)
        if self.queued_rows and self.queued_rows + n > self.max_queue_rows:
            raise QueueFull(f"{self.queued_rows} rows are waiting for this model (limit {self.max_queue_rows})")
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._work())
        item = _Item(x, loop.create_future())
        self.queue.append(item)
        self.queued_rows += n
        self.wakeup.set()
        return await item.future

    async def _take(self) -> list[_Item]:
        """Wait for the first request, then for more until the batch is full or the delay is over.

        The first request is always taken, even when it alone exceeds max_batch:
        every run goes through this one queue, so a graph never runs twice at
        once and big requests cannot oversubscribe the cores.
        """
        while not self.queue:
            if self.closed:
                return []
            self.wakeup.clear()
            await self.wakeup.wait()
        deadline = self.queue[0].enqueued + self.max_delay_s
        while self.queued_rows < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch, rows = [], 0
        while self.queue and (not batch or rows + len(self.queue[0].x) <= self.max_batch):
            item = self.queue.popleft()
            self.queued_rows -= len(item.x)
            if not item.future.cancelled():
                batch.append(item)
                rows += len(item.x)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while not (self.closed and not self.queue):
            batch = await self._take()
            if not batch:
                continue
            now = time.monotonic()
            self.on_batch(sum(len(i.x) for i in batch), max(now - i.enqueued for i in batch))
            xs = np.concatenate([i.x for i in batch]) if len(batch) > 1 else batch[0].x
            try:
                # Small batches run right here: handing a sub-millisecond ONNX Runtime call to a
                # thread costs more (GIL, wake-ups) than it saves. Big ones go to the executor so
                # the loop keeps accepting requests meanwhile.
                if len(xs) <= self.inline_rows:
                    outs = self.run(xs)
                else:
                    outs = await loop.run_in_executor(self.executor, self.run, xs)
            except Exception as exc:  # the graph failed: every waiting request learns why
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            start = 0
            for item in batch:
                n = len(item.x)
                if not item.future.done():
                    item.future.set_result([o[start : start + n] for o in outs])
                start += n

    def close(self) -> None:
        """Finish what is queued, then let the worker end."""
        self.closed = True
        self.wakeup.set()
