"""Async plumbing around the sync core: a bounded inference pool and a micro-batcher.

The event loop only awaits; CPU work runs on the pool's threads. The pool is small (the
measured single-row cost is GIL-bound, so more threads add no throughput) and its queue
is bounded: past the bound, callers get Overloaded at once instead of waiting to time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def _lower_priority(nice: int) -> None:
    """Make this pool thread yield the CPU to the event-loop thread (Linux: per-thread nice).

    On a 1-CPU pod the loop and the pool threads share one core; when both are runnable the
    loop's short jobs (health checks, accepting requests) should win over inference, and
    online inference over background jobs."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: keep the default
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class Overloaded(Exception):
    """More work is queued than the service accepts; the client should retry later."""


class InferencePool:
    """A fixed-size thread pool with a bounded number of queued jobs and live counters."""

    def __init__(self, threads: int, max_queue: int, name: str = "inference", nice: int = 10):
        self.name = name
        self.threads = threads
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=name, initializer=_lower_priority, initargs=(nice,)
        )
        self._lock = threading.Lock()
        self.busy = 0  # jobs running on a thread
        self.queued = 0  # jobs submitted, not yet running

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the pool; raises Overloaded when the queue is full."""
        with self._lock:
            if self.queued >= self.max_queue:
                raise Overloaded(f"{self.queued} jobs already queued on the {self.threads}-thread {self.name} pool")
            self.queued += 1
        # Run in a copy of the caller's context, so tracing spans nest under the request.
        future = self._executor.submit(contextvars.copy_context().run, self._call, fn, args)
        # A caller that gives up (timeout, disconnect) cancels a job that has not started: it
        # must hand back its queue slot, or the pool would shrink until it refuses everything.
        future.add_done_callback(self._release_if_cancelled)
        return await asyncio.wrap_future(future)

    def _release_if_cancelled(self, future) -> None:
        if future.cancelled():
            with self._lock:
                self.queued -= 1

    def _call(self, fn: Callable[..., T], args: tuple) -> T:
        with self._lock:
            self.queued -= 1
            self.busy += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.busy -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)


class MicroBatcher:
    """Coalesces concurrent single-item calls into batches for one batch function.

    No timer: a batch is dispatched as soon as the pool has a free thread, holding every
    item that queued up meanwhile (up to max_batch). An idle service therefore adds no
    latency, and under load batches grow by themselves to match the arrival rate.

    With `inline_max` > 0, a batch that finds no other batch running and holds at most that
    many items is run on the event loop itself, one loop iteration after its first item came
    (so every item the loop already holds joins it): for a cheap batch function (the compiled
    model: ~50 us for one row) the hand-off to a pool thread and back costs more than the
    call, and a lone request pays all of it. Bigger batches, and any while one runs on the
    pool, go to the pool as before, so the loop is never held for more than one small batch.
    """

    def __init__(
        self,
        batch_fn: Callable[[list[Any]], Sequence[Any]],
        pool: InferencePool,
        max_batch: int,
        max_pending: int,
        on_batch: Callable[[int], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
        inline_max: int = 0,
    ):
        self._fn = batch_fn
        self._inline_max = inline_max
        self._scheduled = False  # a dispatch is due at the next loop iteration
        self._pool = pool
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._on_batch = on_batch
        self._on_wait = on_wait
        self._pending: list[tuple[Any, asyncio.Future, float]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Future] = set()  # strong references to running batches

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def submit(self, item: Any) -> Any:
        if len(self._pending) >= self._max_pending:
            raise Overloaded(f"{len(self._pending)} predictions already waiting for a batch")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future, time.perf_counter()))
        if self._inline_max and self._in_flight == 0:
            if not self._scheduled:  # let the callers this loop iteration holds join the batch
                self._scheduled = True
                loop.call_soon(self._dispatch)
        else:
            self._dispatch()
        return await future

    def _dispatch(self) -> None:
        self._scheduled = False
        # One batch per pool thread; the rest wait here, where they can be coalesced.
        while self._pending and self._in_flight < self._pool.threads:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            live = [(item, fut) for item, fut, _ in batch if not fut.done()]  # drop cancelled callers
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(len(live))
            if self._on_wait is not None:
                now = time.perf_counter()
                for _, _fut, queued_at in batch:
                    self._on_wait(now - queued_at)
            if self._in_flight == 0 and len(live) <= self._inline_max:
                self._run_inline(live)
                continue
            self._in_flight += 1
            task = asyncio.ensure_future(self._pool.run(self._fn, [item for item, _ in live]))  # noqa: RUF006 - held in self._tasks
            self._tasks.add(task)
            task.add_done_callback(lambda t, live=live: self._finish(t, live))

    def _run_inline(self, live: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = self._fn([item for item, _ in live])
        except Exception as exc:  # propagate to every caller of the batch
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(live, results, strict=False):
            if not fut.done():
                fut.set_result(result)

    def _finish(self, task: asyncio.Future, live: list[tuple[Any, asyncio.Future]]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        try:
            results = task.result()
        except BaseException as exc:  # propagate to every caller of the batch
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for (_, fut), result in zip(live, results, strict=False):
                if not fut.done():
                    fut.set_result(result)
        self._dispatch()
