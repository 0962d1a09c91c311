"""Scoring jobs of one process: submit, status, result, cancel, and the worker's run of a job.

A job's record (a flat string map, as the Redis hash holds it):
    job_id, status (queued|running|completed|failed|cancelled), filename, rows_total,
    rows_done (rows processed: scored or reported), rows_failed (rows reported as errors),
    chunk_rows, chunks_total, has_customer_id ("1"/"0"), model_version and threshold (of the
    model scoring it), attempts, worker, created_at, updated_at, started_at, completed_at, error.

The run is idempotent, because delivery is at least once (a swept job can have a straggler):
each chunk is stored once, by whichever run gets there first, only while the job is live and
scored by the same model version; a run that finds the job finished or cancelled stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import orjson

from serving import telemetry
from serving.concurrency import InferencePool
from serving.engine import Engine
from serving.jobs.csvfile import Chunks, chunk_as_csv, csv_header, inspect_upload, score_chunk
from serving.jobs.store import TERMINAL, JobStore, MemoryJobStore, RedisJobStore, StoreUnavailable, new_job_id, now_iso
from serving.settings import Settings

logger = logging.getLogger("bentoml.service.bank_churn.jobs")

# Job threads run below the inference pool (nice 10) and the event loop (0): on a shared core
# an online request always wins over a job's chunk.
JOB_THREAD_NICE = 15
PUBLIC_INTS = ("rows_total", "rows_done", "rows_failed", "attempts")
PUBLIC_TEXT = (
    "status",
    "filename",
    "created_at",
    "updated_at",
    "started_at",
    "completed_at",
    "model_version",
    "worker",
    "error",
)


def public(record: dict[str, str]) -> dict[str, Any]:
    """A job's status as the API shows it."""
    out: dict[str, Any] = {"job_id": record["job_id"]}
    for key in PUBLIC_TEXT:
        if record.get(key):
            out[key] = record[key]
    for key in PUBLIC_INTS:
        out[key] = int(record.get(key, "0"))
    return out


def redis_client(url: str) -> Any:
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

    return redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=15,  # must exceed the 5 s blocking dequeue of saq's workers
        socket_keepalive=True,
        health_check_interval=15,
        # Two quick retries ride out a restarted server's dead pooled connections; redis-py's
        # default (3, backing off to 10 s) would hold a request ~7 s before its 503.
        retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=1), retries=2),
    )


class JobManager:
    """The scoring jobs of this process, over the store and delivery BANKCHURN_* selects."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # Checking uploads and scoring chunks: threads of their own, never the online pool.
        self.pool = InferencePool(max(1, settings.job_workers), max_queue=32, name="jobs", nice=JOB_THREAD_NICE)
        self.running = 0
        self.store: JobStore
        if settings.redis_url:
            from serving.jobs.delivery import SaqDelivery

            client = redis_client(settings.redis_url)
            self.backend = "redis"
            self.store = RedisJobStore(client, settings.job_ttl_s)
            self.delivery: Any = SaqDelivery(
                client,
                self.run,
                queue_name=settings.job_queue,
                workers=settings.job_workers,
                heartbeat_s=settings.job_heartbeat_s,
                attempts=settings.job_attempts,
                timeout_s=settings.job_timeout_s,
            )
        else:
            from serving.jobs.delivery import LocalDelivery

            self.backend = "embedded"
            self.store = MemoryJobStore(settings.job_ttl_s)
            self.delivery = LocalDelivery(self.run, settings.job_workers)
            if settings.job_workers == 0:
                logger.warning("BANKCHURN_JOB_WORKERS=0 without BANKCHURN_REDIS_URL: jobs are accepted but never run")

    async def start(self) -> None:
        await self.delivery.start()
        logger.info("scoring jobs: %s store, %d worker(s) in this process", self.backend, self.settings.job_workers)

    async def stop(self) -> None:
        await self.delivery.stop()
        await self.store.close()
        self.pool.shutdown()

    # ------------------------------------------------------------------ the API's side

    async def submit(self, data: bytes, filename: str) -> dict[str, Any]:
        """Check an upload and queue it. Raises CsvRejected (bad file), StoreUnavailable,
        or Overloaded (too many uploads being checked)."""
        upload = await self.pool.run(inspect_upload, data, self.settings.max_csv_rows)
        job_id, stamp = new_job_id(), now_iso()
        chunk_rows = self.settings.job_chunk_rows
        record = {
            "job_id": job_id,
            "status": "queued",
            "filename": filename[:200],
            "rows_total": str(upload.rows),
            "rows_done": "0",
            "rows_failed": "0",
            "chunk_rows": str(chunk_rows),
            "chunks_total": str(math.ceil(upload.rows / chunk_rows)),
            "has_customer_id": "1" if upload.has_customer_id else "0",
            "model_version": self.engine.tag,
            "threshold": repr(self.engine.threshold),
            "attempts": "0",
            "created_at": stamp,
            "updated_at": stamp,
        }
        await self.store.create(job_id, record, data)
        try:
            await self.delivery.enqueue(job_id, self.settings.job_ttl_s)
        except Exception as exc:
            # Not queued: say so in the record (best effort) rather than leave it queued forever.
            with contextlib.suppress(StoreUnavailable):
                await self.store.finish(job_id, "failed", "the job could not be queued")
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(f"the job could not be queued: {type(exc).__name__}: {exc}") from exc
        telemetry.JOBS.labels("submitted").inc()
        logger.info("job %s queued: %d rows from %r", job_id, upload.rows, filename[:200])
        return public(record)

    async def status(self, job_id: str) -> dict[str, str] | None:
        return await self.store.get(job_id)

    async def cancel(self, job_id: str) -> tuple[str, bool]:
        """Cancel a live job: (its status afterwards, whether this call cancelled it). A
        finished job (cancelled included) is left as it is."""
        record = await self.store.get(job_id)
        if record is None:
            return "missing", False
        if record["status"] in TERMINAL:
            return record["status"], False
        status = await self.store.cancel(job_id)
        if status != "cancelled":  # it finished meanwhile
            return status, False
        try:
            await self.delivery.cancel(job_id)
        except Exception:  # the store already refuses its chunks: it stops at its next one anyway
            logger.warning("job %s: the queue could not be told of its cancellation", job_id, exc_info=True)
        telemetry.JOBS.labels("cancelled").inc()
        logger.info("job %s cancelled", job_id)
        return status, True

    async def result_json(self, record: dict[str, str]) -> AsyncIterator[bytes]:
        """A completed job's result as JSON, chunk by chunk (never the whole result in memory)."""
        job_id, chunks = record["job_id"], int(record["chunks_total"])
        head = {
            "job_id": job_id,
            "model_version": record["model_version"],
            "threshold": float(record["threshold"]),
            "rows_total": int(record["rows_total"]),
            "rows_scored": int(record["rows_done"]) - int(record["rows_failed"]),
            "rows_failed": int(record["rows_failed"]),
        }
        yield orjson.dumps(head)[:-1] + b', "predictions": ['
        for part, closing in (("p", b'], "errors": ['), ("e", b"]}")):
            first = True
            for index in range(chunks):
                blob = await self.store.read_chunk(job_id, index, part)
                if blob:
                    yield blob if first else b"," + blob
                    first = False
            yield closing

    async def result_csv(self, record: dict[str, str]) -> AsyncIterator[bytes]:
        """A completed job's result as CSV: one line per data row of the upload, in order."""
        job_id, with_id = record["job_id"], record.get("has_customer_id") == "1"
        yield csv_header(with_id)
        for index in range(int(record["chunks_total"])):
            predictions = await self.store.read_chunk(job_id, index, "p")
            errors = await self.store.read_chunk(job_id, index, "e")
            yield await self.pool.run(chunk_as_csv, predictions, errors, with_id)

    async def depth(self) -> tuple[int | None, int | None]:
        try:
            return await asyncio.wait_for(self.delivery.depth(), timeout=0.5)
        except Exception:
            return None, None

    async def metrics_text(self) -> str:
        queued, active = await self.depth()
        return telemetry.job_metrics(self.backend, queued, active, self.running)

    # ------------------------------------------------------------------ the worker's side

    async def run(self, job_id: str) -> None:
        """Score a job from its first missing chunk to the end. Safe to run again, or twice
        at once: see the module docstring. StoreUnavailable propagates (the delivery retries)."""
        status, attempts = await self.store.start(job_id, self.worker_id)
        if status != "running":
            logger.info("job %s is %s: nothing to run", job_id, status)
            return
        if attempts > self.settings.job_attempts:
            await self._fail(job_id, f"gave up after {attempts - 1} attempts: the workers running it were lost")
            return
        record = await self.store.get(job_id)
        if record is None:
            return
        tag = self.engine.tag
        done = await self.store.done_chunks(job_id)
        if record.get("model_version") != tag:
            if done:
                logger.warning(
                    "job %s: %d chunks were scored by %s; scoring it again with %s so that one model scores it",
                    job_id,
                    len(done),
                    record.get("model_version"),
                    tag,
                )
            await self.store.restart(job_id, tag, repr(self.engine.threshold))
            done = set()
        if done or attempts > 1:
            telemetry.JOB_RESUMES.inc()
            logger.info("job %s: attempt %d, resuming with %d chunk(s) already scored", job_id, attempts, len(done))
        data = await self.store.upload(job_id)
        if data is None:
            await self._fail(job_id, "the uploaded file is gone (it expired before the job ran)")
            return
        self.running += 1
        try:
            await self._score(job_id, record, data, done)
        except asyncio.CancelledError:
            # This worker is stopping (or the job was cancelled): hand it back to the queue.
            await asyncio.shield(self._requeue(job_id))
            raise
        except StoreUnavailable:
            raise
        except Exception as exc:  # a bug, not the data: rows with bad data are reported, not raised
            logger.exception("job %s failed", job_id)
            await self._fail(job_id, f"internal error while scoring ({type(exc).__name__}); see the server log")
        finally:
            self.running -= 1

    async def _score(self, job_id: str, record: dict[str, str], data: bytes, done: set[int]) -> None:
        tag = self.engine.tag
        with_id = record.get("has_customer_id") == "1"
        chunks = await self.pool.run(Chunks, data, int(record["chunk_rows"]))
        del data

        def next_scored() -> tuple[int, Any] | None:
            chunk = chunks.next_chunk(done)
            if chunk is None:
                return None
            index, first_row, records = chunk
            return index, score_chunk(self.engine, chunks.header, first_row, records, with_id, job_id)

        while (scored := await self.pool.run(next_scored)) is not None:
            index, result = scored
            stored = await self.store.write_chunk(
                job_id, index, result.predictions, result.errors, result.scored + result.failed, result.failed, tag
            )
            if stored:
                telemetry.JOB_ROWS.labels("scored").inc(result.scored)
                telemetry.JOB_ROWS.labels("error").inc(result.failed)
                continue
            current = await self.store.get(job_id)
            if current is None or current["status"] in TERMINAL or current.get("model_version") != tag:
                logger.info("job %s: stopping, it is %s", job_id, current["status"] if current else "gone")
                return
            # else another run of this job stored the chunk first: the same rows, the same numbers
        status = await self.store.finish(job_id, "completed")
        if status == "completed":
            telemetry.JOBS.labels("completed").inc()
            finished = await self.store.get(job_id)
            if finished is not None:
                telemetry.JOB_DURATION.observe(_seconds_between(finished["created_at"], finished["completed_at"]))
            logger.info("job %s completed", job_id)
        elif status == "incomplete":  # another run restarted it meanwhile; that run finishes it
            logger.info("job %s: chunks missing at the end (restarted by another worker); leaving it to it", job_id)

    async def _fail(self, job_id: str, error: str) -> None:
        if await self.store.finish(job_id, "failed", error) == "failed":
            telemetry.JOBS.labels("failed").inc()
            logger.warning("job %s failed: %s", job_id, error)

    async def _requeue(self, job_id: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.store.requeue(job_id)


def _seconds_between(start: str, end: str) -> float:
    parse = datetime.fromisoformat
    return max(0.0, (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds())
