"""Who runs which job: saq workers over Redis, or local asyncio workers for the embedded store.

saq (Redis) delivers each job to one worker of the fleet at a time, at least once: a worker
keeps its running job's heartbeat fresh; when the heartbeat goes stale (the pod was killed,
OOM, node lost) a sweep by any live worker puts the job back in the queue, and the next free
worker resumes it from its last checkpoint (the chunks already in the store are not scored
again). On SIGTERM a worker hands its running job back at once instead of waiting for the
sweep. The job's function must therefore be idempotent: see manager.JobManager.run.

Why saq: asyncio-native, Redis-backed, maintained; it has heartbeats and sweeping of
abandoned jobs, aborts and per-job retries built in (taskiq-redis delivers to a worker but
leaves abandoned-job recovery to the broker's acknowledgements and has no progress or abort;
arq is in maintenance mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from serving import telemetry
from serving.jobs.redisconn import DEQUEUE_TIMEOUT_S, store_errors

logger = logging.getLogger("bentoml.service.bank_churn.jobs")

JOB_FUNCTION = "score_csv"
RunJob = Callable[[str], Awaitable[None]]
# saq statuses of a job that a worker holds or will take
LIVE_STATES = frozenset({"new", "queued", "active", "aborting"})


class LocalDelivery:
    """The embedded store's queue: an asyncio queue and `workers` tasks in this process."""

    def __init__(self, run: RunJob, workers: int):
        self._run = run
        self._workers = workers
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._running: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"job-worker-{i}") for i in range(self._workers)]

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._running[key] = asyncio.current_task()
            try:
                await self._run(key)
            except Exception:
                logger.exception("a job failed unexpectedly")
            finally:
                self._running.pop(key, None)

    async def enqueue(self, key: str, ttl_s: int) -> bool:
        self._queue.put_nowait(key)
        return True

    async def cancel(self, key: str) -> None:
        # Nothing to interrupt: the store refuses a cancelled job's further chunks, so its run
        # stops at the next checkpoint, and a queued one is skipped when its turn comes.
        return None

    async def state(self, key: str) -> str | None:
        return "active" if key in self._running else None

    async def erase(self, key: str) -> None:
        return None

    async def depth(self) -> tuple[int, int]:
        return self._queue.qsize(), len(self._running)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _guard(queue: Any, name: str, empty: Any, pause: float = 0.0) -> None:
    """Wrap the queue method `name` so that while Redis is unreachable it returns `empty`
    (after `pause` seconds) instead of raising: saq's worker loops call these every second
    and would otherwise spin, and log a traceback per call, for the whole outage."""
    method = getattr(queue, name)
    errors = store_errors()

    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            result = await method(*args, **kwargs)
        except errors as exc:
            if telemetry.job_store_error(f"queue.{name}"):
                logger.warning("job queue: Redis unreachable (%s: %s); retrying", type(exc).__name__, exc)
            if pause:
                await asyncio.sleep(pause)
            return empty
        telemetry.job_store_ok()
        return result

    setattr(queue, name, guarded)


class SaqDelivery:
    """Jobs delivered by saq over Redis (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        worker_client: Any,
        run: RunJob,
        *,
        queue_name: str,
        workers: int,
        heartbeat_s: int,
        attempts: int,
        timeout_s: int,
    ):
        from saq import Worker
        from saq.queue.redis import RedisQueue

        self.queue = RedisQueue(client, name=queue_name, swept_error_message="worker lost (heartbeat stale)")
        # saq's worker loop on a queue of its own, over the worker client (long socket timeout)
        self.worker_queue = RedisQueue(
            worker_client, name=queue_name, swept_error_message="worker lost (heartbeat stale)"
        )
        for name, empty, pause in (
            ("dequeue", None, 1.0),
            ("schedule", [], 0.0),
            ("sweep", [], 0.0),
            ("write_worker_info", None, 0.0),
            ("jobs", [], 0.0),
            # a job's own bookkeeping in saq: if it is lost, the job's heartbeat goes stale and a
            # sweep hands it out again (the store makes that harmless)
            ("_retry", None, 0.0),
            ("_finish", None, 0.0),
        ):
            _guard(self.worker_queue, name, empty, pause)
        self._run = run
        self._heartbeat_s = heartbeat_s
        # One more saq retry than job attempts: the extra call finds the attempts used up and
        # marks the job failed in the store (saq alone would only mark its own record).
        self._job_options = {"timeout": timeout_s, "heartbeat": heartbeat_s, "retries": attempts + 1}
        self.worker = None
        if workers > 0:
            self.worker = Worker(
                self.worker_queue,
                functions=[(JOB_FUNCTION, self._function)],
                concurrency=workers,
                # sweep: how often some worker of the fleet looks for jobs with a stale heartbeat
                # (one at a time: saq takes a lock for the period); abort: how often a worker
                # checks whether its running jobs were cancelled.
                timers={"sweep": max(1, heartbeat_s // 2), "abort": 1, "schedule": 1, "worker_info": 10},
                dequeue_timeout=DEQUEUE_TIMEOUT_S,
                shutdown_grace_period_s=0,  # on stop, hand running jobs back at once (saq retries them)
            )
            # The server owns SIGTERM/SIGINT (uvicorn's graceful shutdown); saq must not take them.
            self.worker.SIGNALS = []
        self._worker_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.queue.connect()
        await self.worker_queue.connect()
        if self.worker is not None:
            self._worker_task = asyncio.create_task(self.worker.start(), name="saq-worker")

    async def _function(self, ctx: dict[str, Any], *, key: str) -> None:
        job = ctx["job"]

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(self._heartbeat_s / 3)
                # a Redis that is down, full or read-only skips a beat; the loop goes on
                with contextlib.suppress(*store_errors()):
                    await job.update()  # saq's heartbeat: keeps the job from being swept

        beating = asyncio.create_task(heartbeat())
        try:
            await self._run(key)
        finally:
            beating.cancel()

    async def enqueue(self, key: str, ttl_s: int) -> bool:
        """Queue the job; False if saq still holds its key as incomplete (queued, active, or
        a stale entry its sweep has yet to clear)."""
        from saq import Job

        job = Job(JOB_FUNCTION, kwargs={"key": key}, key=key, ttl=ttl_s, **self._job_options)
        return await self.queue.enqueue(job) is not None

    async def cancel(self, key: str) -> None:
        job = await self.queue.job(key)
        if job is not None and job.status.value in ("new", "queued", "active"):
            await self.queue.abort(job, "cancelled by the client")

    async def state(self, key: str) -> str | None:
        """saq's status of the job (queued, active, complete, failed, aborted...), None if it
        has no saq job (never queued, or its entry was lost)."""
        job = await self.queue.job(key)
        return None if job is None else job.status.value

    async def erase(self, key: str) -> None:
        """Drop saq's record of the job (it holds only the key, but an erased job leaves nothing)."""
        await self.queue.redis.delete(self.queue.job_id(key))

    async def depth(self) -> tuple[int, int]:
        return await self.queue.count("queued"), await self.queue.count("active")

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        if self._worker_task is not None:
            self._worker_task.cancel()
            await asyncio.gather(self._worker_task, return_exceptions=True)
        await self.worker_queue.redis.aclose()
