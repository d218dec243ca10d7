"""The dynamic batcher on its own: merging, the adaptive wait, instances, failures, the bounded queue.

The graph is a plain numpy function (what the batcher runs is any callable);
the rest is the real batcher on a real event loop and thread pool.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from zspace.errors import UserError
from zspace.service.batcher import PROBE_EVERY, DynamicBatcher, QueueFull, WouldBlock
from zspace.service.config import BatchConfig


class Graph:
    """Doubles its input; records batch sizes and how many runs overlapped."""

    def __init__(self, seconds: float = 0.0, fail: bool = False):
        self.seconds, self.fail = seconds, fail
        self.batches: list[int] = []
        self.active = self.most_active = 0
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.batches.append(len(x))
        try:
            if self.seconds:
                time.sleep(self.seconds)
            if self.fail:
                raise RuntimeError("graph failed")
            return [x * 2, x.sum(1, keepdims=True)]
        finally:
            with self.lock:
                self.active -= 1


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n * 3, dtype=np.float32).reshape(n, 3)


def test_concurrent_requests_merge_and_split_back():
    graph = Graph()

    async def main():
        b = DynamicBatcher(graph, BatchConfig(max_batch=64, max_delay_ms=50))
        xs = [rows(i % 3 + 1, 100 * i) for i in range(10)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        for x, (doubled, sums) in zip(xs, outs):
            np.testing.assert_array_equal(doubled, x * 2)
            np.testing.assert_array_equal(sums, x.sum(1, keepdims=True))
        b.close()

    asyncio.run(main())
    assert graph.batches == [sum(i % 3 + 1 for i in range(10))]  # one run for all ten


def test_max_batch_bounds_a_run_but_never_splits_a_request():
    graph = Graph()

    async def main():
        b = DynamicBatcher(graph, BatchConfig(max_batch=4, max_delay_ms=50, inline_rows=0))
        outs = await asyncio.gather(b.submit(rows(3)), b.submit(rows(3, 9)), b.submit(rows(10, 99)))
        np.testing.assert_array_equal(outs[2][0], rows(10, 99) * 2)
        b.close()

    asyncio.run(main())
    assert graph.batches == [3, 3, 10]


def test_the_wait_stops_when_it_merges_nothing_and_probes_again():
    """One client at a time: after a few waits that merged nothing, requests run at once."""
    graph = Graph()

    async def main():
        b = DynamicBatcher(graph, BatchConfig(max_batch=64, max_delay_ms=20))
        times, decisions = [], []
        for i in range(PROBE_EVERY + 12):
            decisions.append(b._should_wait())  # what the idle batcher decides for the next request
            t = time.perf_counter()
            await b.submit(rows(1, i))
            times.append(time.perf_counter() - t)
        b.close()
        return b, times, decisions

    # The decisions, not the clock, say which calls waited: a loaded machine can make any call slow.
    # Only the lower bound is timed: a call that waited took at least the delay.
    b, times, waited = asyncio.run(main())
    assert all(t >= 0.015 for t, w in zip(times, waited) if w)
    assert all(waited[:3])  # it starts out waiting
    first_fast = waited.index(False)
    assert first_fast <= 10
    # After that, only the periodic probe waits.
    assert sum(waited[first_fast:]) == 1
    assert waited[first_fast + PROBE_EVERY]
    assert b.merge_share < 0.25


def test_the_wait_resumes_when_clients_send_concurrently():
    graph = Graph(seconds=0.01)

    async def main():
        b = DynamicBatcher(graph, BatchConfig(max_batch=64, max_delay_ms=5, inline_rows=0))
        for i in range(15):  # a lone client teaches it not to wait
            await b.submit(rows(1, i))
        assert b.merge_share < 0.25
        graph.batches.clear()
        for _ in range(5):  # then bursts of 16 concurrent clients
            await asyncio.gather(*(b.submit(rows(1, i)) for i in range(16)))
        b.close()
        return b

    b = asyncio.run(main())
    assert b.merge_share >= 0.25
    assert max(graph.batches) == 16
    assert len(graph.batches) <= 10


def test_instances_bound_parallel_runs():
    for instances in (1, 3):
        graph = Graph(seconds=0.03)

        async def main():
            b = DynamicBatcher(graph, BatchConfig(max_batch=1, max_delay_ms=0, inline_rows=0, instances=instances))
            outs = await asyncio.gather(*(b.submit(rows(1, i)) for i in range(9)))
            for i, (doubled, _) in enumerate(outs):
                np.testing.assert_array_equal(doubled, rows(1, i) * 2)
            b.close()

        asyncio.run(main())
        assert graph.most_active == instances
        assert len(graph.batches) == 9


def test_a_failing_graph_fails_every_request_of_its_batch_and_the_next_batch_still_runs():
    for inline in (0, 64):
        graph = Graph(fail=True)

        async def main():
            b = DynamicBatcher(graph, BatchConfig(max_batch=64, max_delay_ms=20, inline_rows=inline))
            results = await asyncio.gather(*(b.submit(rows(1, i)) for i in range(4)), return_exceptions=True)
            assert all(isinstance(r, RuntimeError) for r in results)
            graph.fail = False
            (doubled, _), = [await b.submit(rows(2))]
            np.testing.assert_array_equal(doubled, rows(2) * 2)
            b.close()

        asyncio.run(main())


def test_a_full_queue_refuses_at_once_and_cancelled_requests_are_skipped():
    graph = Graph()

    async def main():
        b = DynamicBatcher(graph, BatchConfig(max_batch=64, max_delay_ms=200, max_queue_rows=4))
        first = asyncio.ensure_future(b.submit(rows(3)))
        gone = asyncio.ensure_future(b.submit(rows(1, 50)))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="4"):
            await b.submit(rows(2))
        gone.cancel()
        doubled, _ = await first
        np.testing.assert_array_equal(doubled, rows(3) * 2)
        b.close()

    asyncio.run(main())
    assert graph.batches == [3]


def test_an_inline_run_that_would_block_goes_to_a_thread():
    calls = []

    def run(x, inline=False):
        calls.append((inline, threading.current_thread() is threading.main_thread()))
        if inline:
            raise WouldBlock
        return [x * 2]

    async def main():
        b = DynamicBatcher(run, BatchConfig(max_batch=8, max_delay_ms=0, inline_rows=8), run_declines=True)
        (doubled,) = await b.submit(rows(2))
        np.testing.assert_array_equal(doubled, rows(2) * 2)
        b.close()

    asyncio.run(main())
    assert calls == [(True, True), (False, False)]


def test_instances_must_be_positive():
    with pytest.raises(UserError, match="instances"):
        DynamicBatcher(Graph(), BatchConfig(instances=0))


def test_big_and_small_requests_queue_in_lanes_of_their_own():
    graph = Graph(seconds=0.05)

    async def main():
        b = DynamicBatcher(graph, BatchConfig(max_batch=4, max_delay_ms=0, max_queue_rows=8, inline_rows=0))
        # One big request runs, one more is handed to the thread, the third waits in the big lane (6 rows).
        big = []
        for i in range(3):
            big.append(asyncio.ensure_future(b.submit(rows(6, i))))
            await asyncio.sleep(0.005)  # the worker takes what it can before the next arrives
        assert b.queued_big_rows == 6
        with pytest.raises(QueueFull, match="in requests over 4 rows"):
            await b.submit(rows(6))  # the big lane is full
        small = [asyncio.ensure_future(b.submit(rows(2, i))) for i in range(4)]  # the small lane takes 8 rows
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="in requests up to 4 rows"):
            await b.submit(rows(2))
        await asyncio.gather(*big, *small)
        assert b.queued_rows == b.queued_big_rows == 0
        b.close()

    asyncio.run(main())
