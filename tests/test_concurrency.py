"""The inference pool and micro-batcher, with real threads and a real event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.concurrency import InferencePool, MicroBatcher, Overloaded


def slow_double(items: list[int]) -> list[int]:
    time.sleep(0.02)
    return [2 * i for i in items]


def test_concurrent_calls_are_coalesced_and_answered_in_order():
    batches: list[int] = []

    async def main():
        pool = InferencePool(threads=1, max_queue=100)
        batcher = MicroBatcher(slow_double, pool, max_batch=64, max_pending=1000, on_batch=batches.append)
        return await asyncio.gather(*(batcher.submit(i) for i in range(50)))

    assert asyncio.run(main()) == [2 * i for i in range(50)]
    assert batches[0] == 1  # the first call does not wait for company
    assert len(batches) <= 3 and sum(batches) == 50


def test_max_batch_is_respected():
    batches: list[int] = []

    async def main():
        batcher = MicroBatcher(
            slow_double, InferencePool(1, 100), max_batch=8, max_pending=1000, on_batch=batches.append
        )
        await asyncio.gather(*(batcher.submit(i) for i in range(40)))

    asyncio.run(main())
    assert max(batches) == 8 and sum(batches) == 40


def test_pending_bound_sheds_load_immediately():
    async def main():
        batcher = MicroBatcher(slow_double, InferencePool(1, 100), max_batch=1, max_pending=5)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)), return_exceptions=True)
        return results

    start = time.perf_counter()
    results = asyncio.run(main())
    shed = [r for r in results if isinstance(r, Overloaded)]
    assert shed and len(shed) < 20
    assert all(r == 2 * i for i, r in enumerate(results) if not isinstance(r, Exception))
    assert time.perf_counter() - start < 1.0


def test_pool_queue_bound():
    async def main():
        pool = InferencePool(threads=1, max_queue=2)
        return await asyncio.gather(*(pool.run(time.sleep, 0.05) for _ in range(6)), return_exceptions=True)

    results = asyncio.run(main())
    assert sum(isinstance(r, Overloaded) for r in results) >= 3


def test_batch_errors_reach_every_caller_and_the_batcher_recovers():
    calls = {"n": 0}

    def flaky(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("boom")
        return items

    async def main():
        batcher = MicroBatcher(flaky, InferencePool(1, 10), max_batch=10, max_pending=100)
        first = await asyncio.gather(batcher.submit(1), return_exceptions=True)
        second = await batcher.submit(2)
        return first, second

    first, second = asyncio.run(main())
    assert isinstance(first[0], ValueError) and second == 2


def test_cancelled_callers_do_not_break_the_batch():
    async def main():
        batcher = MicroBatcher(slow_double, InferencePool(1, 10), max_batch=10, max_pending=100)
        first = asyncio.ensure_future(batcher.submit(1))
        doomed = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0)
        doomed.cancel()
        return await first, await kept

    assert asyncio.run(main()) == (2, 6)


def test_work_runs_off_the_event_loop_thread():
    seen: list[str] = []

    async def main():
        pool = InferencePool(threads=2, max_queue=10)
        await pool.run(lambda: seen.append(threading.current_thread().name))
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    assert seen and seen[0] != loop_thread and seen[0].startswith("inference")


@pytest.mark.parametrize("threads", [1, 2])
def test_busy_and_queued_counters_return_to_zero(threads):
    async def main():
        pool = InferencePool(threads=threads, max_queue=50)
        await asyncio.gather(*(pool.run(time.sleep, 0.01) for _ in range(10)))
        return pool

    pool = asyncio.run(main())
    assert (pool.busy, pool.queued) == (0, 0)


def test_pool_threads_run_at_lower_priority_than_the_loop():
    import os

    async def main():
        pool = InferencePool(threads=1, max_queue=10)
        return await pool.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    assert asyncio.run(main()) == os.getpriority(os.PRIO_PROCESS, 0) + 10


def test_small_batches_run_on_the_loop_when_the_pool_is_idle():
    """inline_max: a lone call, and the calls one loop iteration holds, run on the loop thread
    in one batch; a batch bigger than inline_max, and batches while one runs, go to the pool."""
    calls: list[tuple[int, int]] = []  # (batch size, thread id)

    def double(items: list[int]) -> list[int]:
        calls.append((len(items), threading.get_ident()))
        time.sleep(0.01)
        return [2 * i for i in items]

    async def main():
        loop_thread = threading.get_ident()
        batcher = MicroBatcher(double, InferencePool(1, 100), max_batch=64, max_pending=1000, inline_max=4)
        assert await batcher.submit(1) == 2  # alone
        assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 2, 4]  # together
        assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == [2 * i for i in range(10)]
        return loop_thread

    loop_thread = asyncio.run(main())
    assert calls[0] == (1, loop_thread) and calls[1] == (3, loop_thread)
    assert calls[2][0] == 10 and calls[2][1] != loop_thread  # too big for the loop: the pool's


def test_an_inline_batch_that_fails_fails_its_callers_only():
    def fail(items: list[int]) -> list[int]:
        raise ValueError("boom")

    async def main():
        batcher = MicroBatcher(fail, InferencePool(1, 10), max_batch=10, max_pending=100, inline_max=4)
        return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    assert [type(r) for r in asyncio.run(main())] == [ValueError, ValueError]
