"""Dynamic batching: merge concurrent small requests into one ONNX Runtime call.

One batcher per model graph. Requests queue as row blocks; a worker takes
rows until `max_batch` rows or `max_delay_s` after the oldest waiting
request, runs the graph once and splits the outputs back.

Why the wait adapts: gRPC hands a Python server its requests one at a time,
so without waiting a busy server still runs batches of about one row. Waiting pays only when other
clients are sending, and costs a single client the whole delay. So the
batcher keeps a running share of its waits that merged requests: while
waits merge, it waits; when they stop merging, it stops waiting and only
tries again every `PROBE_EVERY` batches (or as soon as requests pile up by
themselves). It starts out waiting.

The batcher owns `instances` threads (Triton's instance count): at most
that many runs at once, so the cores are shared out by ONNX Runtime threads
within a run and by parallel runs, never oversubscribed. One more batch
per instance waits in the threads' queue, so a finished run is followed at
once by the next instead of after a round trip through the event loop
(benchmarks/README.md has the figures).
Small batches (up to `inline_rows`, when nothing else runs) run on the
event loop's own thread: handing a sub-millisecond call to a
thread costs more than it saves (a run function that may have to wait, like
a search during an index write, declines with WouldBlock and goes to a
thread after all). The queue is bounded in rows: beyond it a
request is refused at once (QueueFull, RESOURCE_EXHAUSTED to the client).
A request cancelled while queued (deadline, client gone) is skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from zspace.service.config import BatchConfig

# The rows in, a list of outputs out: each one row per input row (an array, or a list: both slice alike).
RunFn = Callable[[np.ndarray], list[np.ndarray]]
PROBE_EVERY = 64      # batches between tries at waiting while waiting does not merge
MERGE_SHARE_MIN = 0.25  # keep waiting while at least this share of recent waits merged requests
MERGE_MEMORY = 0.2      # weight of the newest wait in that share


class QueueFull(Exception):
    """The batcher's queue holds its maximum number of rows."""


class WouldBlock(Exception):
    """Raised by a run function called inline that would have to wait (e.g. for a lock): run it in a thread instead."""


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    inline_ok: bool = True  # False once a run on the loop declined it


class DynamicBatcher:
    def __init__(self, run: RunFn, config: BatchConfig = BatchConfig(), *,
                 on_batch: Callable[[int, float], None] | None = None, run_declines: bool = False,
                 name: str = "batcher"):
        self.run, self.config = run, config
        self.max_batch, self.max_queue_rows = config.max_batch, config.max_queue_rows
        self.max_delay_s, self.inline_rows, self.instances = config.max_delay_ms / 1000, config.inline_rows, config.instances
        self.executor = ThreadPoolExecutor(max_workers=self.instances, thread_name_prefix=name)  # threads start on first use
        self.run_declines = run_declines  # run(x, inline=True) may raise WouldBlock
        self.on_batch = on_batch or (lambda rows, queued_s: None)
        self.queue: deque[_Item] = deque()
        self.queued_rows = 0
        self.queued_big_rows = 0  # of which in requests bigger than max_batch
        self.running = 0          # batches handed to the threads (running or queued there)
        self.merge_share = 1.0    # running share of waits that merged requests
        self.since_wait = 0       # batches taken without waiting since the last wait
        self.wakeup = asyncio.Event()
        self.worker: asyncio.Task | None = None
        self.closed = False

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running: a request now would run at once."""
        return not self.queue and not self.running

    async def submit(self, x: np.ndarray) -> list[np.ndarray]:
        """Run the graph on x's rows, merged with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        n = len(x)
        # Two lanes of max_queue_rows each: requests up to max_batch rows, and bigger ones. A flood of
        # big requests then cannot crowd out small ones; an empty lane takes a request of any size.
        big = n > self.max_batch
        waiting = self.queued_big_rows if big else self.queued_rows - self.queued_big_rows
        if waiting and waiting + n > self.max_queue_rows:
            raise QueueFull(f"{waiting} rows are waiting for this model in requests {'over' if big else 'up to'} "
                            f"{self.max_batch} rows (limit {self.max_queue_rows})")
        inline_ok = True
        if not self.queue and not self.running and n <= self.inline_rows and not self._should_wait():
            # Idle, and no reason to wait for company: run right here, without the hop through the worker.
            self._learn(False, 1)
            try:
                out = self.run(x, inline=True) if self.run_declines else self.run(x)
            except WouldBlock:
                inline_ok = False  # queue it: the worker hands it to a thread
            else:
                self.on_batch(n, 0.0)
                return out
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._work())
        item = _Item(x, loop.create_future(), inline_ok=inline_ok)
        self.queue.append(item)
        self.queued_rows += n
        self.queued_big_rows += n if big else 0
        # The worker needs waking only for a first request or a full batch; the delay has its own timer.
        if len(self.queue) == 1 or self.queued_rows >= self.max_batch:
            self.wakeup.set()
        return await item.future

    # ------------------------------------------------------------ the worker

    async def _work(self) -> None:
        while not (self.closed and not self.queue):
            while self.running >= 2 * self.instances:  # every instance busy, one more queued each: requests pile up
                await self._sleep_until_woken()
            batch = await self._take()
            if not batch:
                continue
            now = time.monotonic()
            self.on_batch(sum(len(i.x) for i in batch), max(now - i.enqueued for i in batch))
            xs = np.concatenate([i.x for i in batch]) if len(batch) > 1 else batch[0].x
            if len(xs) <= self.inline_rows and not self.running and all(i.inline_ok for i in batch):
                try:
                    outs = self.run(xs, inline=True) if self.run_declines else self.run(xs)
                except WouldBlock:
                    pass  # to the executor, below
                except Exception as exc:  # the graph failed: every waiting request learns why
                    self._fail(batch, exc)
                    continue
                else:
                    self._answer(batch, outs)
                    continue
            self.running += 1
            done = asyncio.get_running_loop().run_in_executor(self.executor, self.run, xs)
            done.add_done_callback(lambda f, b=batch: self._finished(b, f))

    def _finished(self, batch: list[_Item], done: asyncio.Future) -> None:
        self.running -= 1
        self.wakeup.set()  # an instance is free
        if done.cancelled():
            self._fail(batch, asyncio.CancelledError())
        elif done.exception() is not None:
            self._fail(batch, done.exception())
        else:
            self._answer(batch, done.result())

    @staticmethod
    def _answer(batch: list[_Item], outs: list[np.ndarray]) -> None:
        start = 0
        for item in batch:
            n = len(item.x)
            if not item.future.done():
                item.future.set_result([o[start : start + n] for o in outs])
            start += n

    @staticmethod
    def _fail(batch: list[_Item], exc: BaseException) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)

    async def _sleep_until_woken(self, timeout: float | None = None) -> None:
        self.wakeup.clear()
        timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, self.wakeup.set)
        await self.wakeup.wait()
        if timer:
            timer.cancel()

    def _should_wait(self) -> bool:
        return self.max_delay_s > 0 and (self.merge_share >= MERGE_SHARE_MIN or self.since_wait >= PROBE_EVERY)

    def _learn(self, waited: bool, requests: int) -> None:
        merged = requests > 1
        if waited:
            self.since_wait = 0
            self.merge_share += MERGE_MEMORY * (merged - self.merge_share)
        else:
            self.since_wait += 1
            if merged:  # requests piled up without any waiting: clients are sending concurrently
                self.merge_share += MERGE_MEMORY * (1.0 - self.merge_share)

    async def _take(self) -> list[_Item]:
        """Wait for the first request, then (when waiting pays) for more until the batch is full or the delay is over.

        The first request is always taken, even when it alone exceeds max_batch:
        big requests are never split, and never run more than `instances` at once.
        """
        while not self.queue:
            if self.closed:
                return []
            await self._sleep_until_woken()
        waited = self._should_wait()
        if waited:
            deadline = self.queue[0].enqueued + self.max_delay_s
            while self.queued_rows < self.max_batch and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._sleep_until_woken(remaining)
        batch, rows = [], 0
        while self.queue and (not batch or rows + len(self.queue[0].x) <= self.max_batch):
            item = self.queue.popleft()
            self.queued_rows -= len(item.x)
            if len(item.x) > self.max_batch:
                self.queued_big_rows -= len(item.x)
            if not item.future.cancelled():
                batch.append(item)
                rows += len(item.x)
        self._learn(waited, len(batch))
        return batch

    def close(self) -> None:
        """Finish what is queued, then let the worker end.

        The threads stay until the batcher is dropped (idle ones cost nothing): a
        request that still holds a retired model can finish on them."""
        self.closed = True
        self.wakeup.set()
