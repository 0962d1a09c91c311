"""Scoring jobs of one process: submit, status, result, cancel, erase, and the worker's run.

A job's record (a flat string map, as the Redis hash holds it):
    ref (store.job_ref), status (queued|running|completed|failed|cancelled), owner (the API
    key's name, "" when authentication is off), filename, rows_total, rows_done (rows
    processed: scored or reported), rows_failed (rows reported as errors), chunk_rows,
    chunks_total, has_customer_id ("1"/"0"), model_version and threshold (of the model
    scoring it), accepted ("1" once the client was answered 202), attempts, worker,
    created_at, updated_at, started_at, completed_at, error.
The job's id is not in it: the store keys a job by the SHA-256 of its id (store.py).

The run is idempotent, because delivery is at least once (a swept job can have a straggler):
each chunk is stored once, by whichever run gets there first, only while the job is live and
scored by the same model version; a run that finds the job finished or cancelled stops. A
run that ends with a chunk missing scores the missing chunks again.

Nothing is left queued or running when Redis recovers from an outage: the worker's store
calls wait for Redis (STORE_PATIENCE_S) instead of abandoning the job, and a reconciler on
the job workers (BANKCHURN_JOB_RECONCILE_S) walks the live jobs: one whose queue entry was lost is queued
again (or failed, once its attempts are used up), one that was never accepted (its client
got a 503) is failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import IO, Any, TypeVar

import orjson

from serving import telemetry
from serving.concurrency import InferencePool
from serving.engine import Engine
from serving.jobs.csvfile import (
    CsvRejected,
    Upload,
    chunk_as_csv,
    csv_header,
    read_chunk,
    reduce_upload,
    score_chunk,
)
from serving.jobs.redisconn import describe, redis_clients, store_errors
from serving.jobs.store import (
    TERMINAL,
    JobStore,
    MemoryJobStore,
    RedisJobStore,
    StoreUnavailable,
    job_key,
    job_ref,
    new_job_id,
    now_iso,
)
from serving.jobs.watchdog import exit_with_parent
from serving.settings import Settings

logger = logging.getLogger("bentoml.service.bank_churn.jobs")
T = TypeVar("T")

# Job threads run below the inference pool (nice 10) and the event loop (0): on a shared core
# an online request always wins over a job's chunk.
JOB_THREAD_NICE = 15
PUBLIC_INTS = ("rows_total", "rows_done", "rows_failed", "attempts")
PUBLIC_TEXT = (
    "ref",
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
# How long a best-effort clean-up (in the background) may take after the store failed a request.
CLEANUP_S = 5.0
# How long a worker waits for a job's acceptance (set by the API right after the enqueue).
ACCEPT_WAIT_S = 5.0
# How long a worker's store call waits for Redis to come back before the run gives up (the
# job is then re-run by the queue's retry or the reconciler).
STORE_PATIENCE_S = 600.0
MAX_SCORING_PASSES = 3


def public(record: dict[str, str], job_id: str) -> dict[str, Any]:
    """A job's status as the API shows it."""
    out: dict[str, Any] = {"job_id": job_id}
    for key in PUBLIC_TEXT:
        if record.get(key):
            out[key] = record[key]
    for key in PUBLIC_INTS:
        out[key] = int(record.get(key, "0"))
    return out


def may_use(record: dict[str, str], principal: Any) -> bool:
    """Whether a request's principal may see and change this job: its owner, or a key with
    the admin scope; anyone when authentication is off (principal None: the id is the secret)."""
    if principal is None:
        return True
    return "admin" in principal.scopes or (bool(record.get("owner")) and record.get("owner") == principal.name)


class JobManager:
    """The scoring jobs of this process, over the store and delivery BANKCHURN_* selects."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # Scoring chunks: threads of their own, never the online pool.
        self.pool = InferencePool(max(1, settings.job_workers), max_queue=32, name="jobs", nice=JOB_THREAD_NICE)
        # Checking uploads: one thread per upload slot (routes.py bounds the uploads).
        slots = settings.max_concurrent_uploads
        self.upload_pool = InferencePool(slots, max_queue=slots, name="uploads", nice=JOB_THREAD_NICE)
        self.running = 0
        self._cleanups: set[asyncio.Future] = set()
        self.store: JobStore
        self._reconciler: asyncio.Task | None = None
        if settings.redis_url:
            from serving.jobs.delivery import SaqDelivery

            client, worker_client = redis_clients(settings.redis_url, settings.redis_timeout_s, settings.redis_ca_file)
            self.backend = "redis"
            self.store = RedisJobStore(client, settings.job_ttl_s)
            self.delivery: Any = SaqDelivery(
                client,
                worker_client,
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
        import bentoml

        if bentoml.server_context.worker_index is not None:
            # A `bentoml serve` worker whose arbiter was killed outright must not go on taking
            # jobs (watchdog.py). Not in-process servers (tests): their parent is not an arbiter.
            exit_with_parent()
        await self.delivery.start()
        if self.backend == "redis" and self.settings.job_workers > 0:
            self._reconciler = asyncio.create_task(self._reconcile_forever(), name="job-reconciler")
        logger.info("scoring jobs: %s store, %d worker(s) in this process", self.backend, self.settings.job_workers)

    async def stop(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            await asyncio.gather(self._reconciler, return_exceptions=True)
        await self.delivery.stop()
        await self.store.close()
        self.pool.shutdown()
        self.upload_pool.shutdown()

    # ------------------------------------------------------------------ the API's side

    async def submit(self, source: IO[bytes], filename: str, owner: str) -> dict[str, Any]:
        """Check and reduce an upload (a file positioned at 0), store it and queue it. Raises
        CsvRejected (a file that cannot be scored), StoreUnavailable, or Overloaded."""
        chunk_rows = self.settings.job_chunk_rows
        with tempfile.TemporaryFile(prefix="bank-churn-reduced-") as reduced:
            upload = await self.upload_pool.run(reduce_upload, source, self.settings.max_csv_rows, chunk_rows, reduced)
            job_id = new_job_id()
            key = job_key(job_id)
            try:
                await self._stage(key, upload)
            except StoreUnavailable:
                self._later(self.store.discard_upload(key))  # the client's 503 does not wait for it
                raise
        stamp = now_iso()
        record = {
            "ref": job_ref(key),
            "status": "queued",
            "owner": owner,
            "filename": filename[:200],
            "rows_total": str(upload.rows),
            "rows_done": "0",
            "rows_failed": "0",
            "chunk_rows": str(chunk_rows),
            "chunks_total": str(len(upload.chunks)),
            "has_customer_id": "1" if upload.has_customer_id else "0",
            "model_version": self.engine.tag,
            "threshold": repr(self.engine.threshold),
            "accepted": "0",
            "attempts": "0",
            "created_at": stamp,
            "updated_at": stamp,
        }
        await self.store.create(key, record)
        try:
            if not await self.delivery.enqueue(key, self.settings.job_ttl_s):
                raise RuntimeError("the queue refused a new job's key")  # a fresh 128-bit id: not expected
            await self.store.accept(key)
        except Exception as exc:
            # Not accepted: the client gets a 503 (at once). Fail the record if the store lets
            # us; else the worker (ACCEPT_WAIT_S) or the reconciler fails it: it never runs.
            self._later(self.store.finish(key, "failed", "not accepted: the job store failed during submission"))
            if isinstance(exc, StoreUnavailable):
                raise
            if isinstance(exc, store_errors()):
                raise StoreUnavailable(
                    f"the job could not be queued: the job store (Redis) is {describe(exc)}"
                ) from exc
            raise
        telemetry.JOBS.labels("submitted").inc()
        logger.info("job %s queued: %d rows in %d chunks", record["ref"], upload.rows, len(upload.chunks))
        return public(record, job_id)

    def _later(self, cleanup: Awaitable[Any]) -> None:
        """A best-effort store call in the background (kept referenced until it is done)."""
        task = asyncio.ensure_future(_quietly(cleanup))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _stage(self, key: str, upload: Upload) -> None:
        for index in range(len(upload.chunks)):
            blob = await self.upload_pool.run(upload.chunk, index)  # a file read: off the loop
            await self.store.stage_upload(key, index, blob)

    async def status(self, job_id: str) -> dict[str, str] | None:
        return await self.store.get(job_key(job_id))

    async def cancel(self, job_id: str) -> tuple[str, bool]:
        """Cancel a live job: (its status afterwards, whether this call cancelled it). What it
        scored so far is erased with its upload; its record stays, cancelled."""
        key = job_key(job_id)
        record = await self.store.get(key)
        if record is None:
            return "missing", False
        if record["status"] in TERMINAL:
            return record["status"], False
        status = await self.store.cancel(key)
        if status != "cancelled":  # it finished meanwhile
            return status, False
        try:
            await self.delivery.cancel(key)
        except Exception:  # the store already refuses its chunks: it stops at its next one anyway
            logger.warning("job %s: the queue could not be told of its cancellation", job_ref(key), exc_info=True)
        telemetry.JOBS.labels("cancelled").inc()
        logger.info("job %s cancelled", job_ref(key))
        return status, True

    async def erase(self, job_id: str) -> bool:
        """Delete a finished job and its results (the customer-data erasure case)."""
        key = job_key(job_id)
        erased = await self.store.erase(key)
        if erased:
            with contextlib.suppress(Exception):  # saq's record holds only the key; it expires anyway
                await self.delivery.erase(key)
            telemetry.JOBS.labels("erased").inc()
            logger.info("job %s erased", job_ref(key))
        return erased

    async def result_json(self, record: dict[str, str], job_id: str) -> AsyncIterator[bytes]:
        """A completed job's result as JSON, chunk by chunk (never the whole result in memory)."""
        key, chunks = job_key(job_id), int(record["chunks_total"])
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
                blob = await self.store.read_chunk(key, index, part)
                if blob:
                    yield blob if first else b"," + blob
                    first = False
            yield closing

    async def result_csv(self, record: dict[str, str], job_id: str) -> AsyncIterator[bytes]:
        """A completed job's result as CSV: one line per data row of the upload, in order."""
        key, with_id = job_key(job_id), record.get("has_customer_id") == "1"
        yield csv_header(with_id)
        for index in range(int(record["chunks_total"])):
            predictions = await self.store.read_chunk(key, index, "p")
            errors = await self.store.read_chunk(key, index, "e")
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

    async def run(self, key: str) -> None:
        """Score a job from its first missing chunk to the end. Safe to run again, or twice
        at once: see the module docstring."""
        ref = job_ref(key)
        status, attempts = await self._patiently(self.store.start, key, self.worker_id)
        if status != "running":
            logger.info("job %s is %s: nothing to run", ref, status)
            return
        if attempts > self.settings.job_attempts:
            await self._fail(key, f"gave up after {attempts - 1} attempts: the workers running it were lost")
            return
        record = await self._accepted(key)
        if record is None:
            return
        tag = self.engine.tag
        done = await self._patiently(self.store.done_chunks, key)
        if record.get("model_version") != tag:
            if done:
                logger.warning(
                    "job %s: %d chunks were scored by %s; scoring it again with %s so that one model scores it",
                    ref,
                    len(done),
                    record.get("model_version"),
                    tag,
                )
            await self._patiently(self.store.restart, key, tag, repr(self.engine.threshold))
            done = set()
        if done or attempts > 1:
            telemetry.JOB_RESUMES.inc()
            logger.info("job %s: attempt %d, resuming with %d chunk(s) already scored", ref, attempts, len(done))
        self.running += 1
        try:
            await self._score(key, record, done)
        except asyncio.CancelledError:
            # This worker is stopping (or the job was cancelled): hand it back to the queue.
            await asyncio.shield(_quietly(self.store.requeue(key)))
            raise
        except StoreUnavailable:
            raise  # Redis stayed away past STORE_PATIENCE_S: the queue retries the job
        except Exception as exc:  # a bug, not the data: rows with bad data are reported, not raised
            logger.exception("job %s failed", ref)
            await self._fail(key, f"internal error while scoring ({type(exc).__name__}); see the server log")
        finally:
            self.running -= 1

    async def _accepted(self, key: str) -> dict[str, str] | None:
        """The job's record once its submission was accepted; fails a job that never is."""
        deadline = time.monotonic() + ACCEPT_WAIT_S
        while True:
            record = await self._patiently(self.store.get, key)
            if record is None or record["status"] in TERMINAL:
                return None
            if record.get("accepted") == "1":
                return record
            if time.monotonic() > deadline:
                await self._fail(key, "not accepted: the job store failed during submission")
                return None
            await asyncio.sleep(0.1)

    async def _score(self, key: str, record: dict[str, str], done: set[int]) -> None:
        ref, tag = job_ref(key), self.engine.tag
        with_id = record.get("has_customer_id") == "1"
        chunks = int(record["chunks_total"])

        def scored(blob: bytes) -> Any:
            return score_chunk(self.engine, read_chunk(blob), with_id, ref)

        for _ in range(MAX_SCORING_PASSES):
            for index in range(chunks):
                if index in done:
                    continue
                blob = await self._patiently(self.store.upload_chunk, key, index)
                if blob is None:
                    current = await self._patiently(self.store.get, key)
                    if current is None or current["status"] in TERMINAL:
                        logger.info("job %s: stopping, it is %s", ref, current["status"] if current else "gone")
                        return
                    await self._fail(key, "the uploaded file is gone (it expired before the job ran)")
                    return
                result = await self.pool.run(scored, blob)
                del blob
                stored = await self._patiently(
                    self.store.write_chunk,
                    key,
                    index,
                    result.predictions,
                    result.errors,
                    result.scored + result.failed,
                    result.failed,
                    tag,
                )
                if stored:
                    telemetry.JOB_ROWS.labels("scored").inc(result.scored)
                    telemetry.JOB_ROWS.labels("error").inc(result.failed)
                    continue
                current = await self._patiently(self.store.get, key)
                if current is None or current["status"] in TERMINAL or current.get("model_version") != tag:
                    logger.info("job %s: stopping, it is %s", ref, current["status"] if current else "gone")
                    return
                # else another run of this job stored the chunk first: the same rows, the same numbers
            status = await self._patiently(self.store.finish, key, "completed")
            if status != "incomplete":
                break
            # A chunk is missing at the end: another run restarted the job (a new model), or
            # Redis lost a write (a crash inside its fsync second). Ours to redo if it is still ours.
            current = await self._patiently(self.store.get, key)
            if current is None or current["status"] in TERMINAL or current.get("model_version") != tag:
                logger.info("job %s: chunks missing at the end, and it is no longer ours to finish", ref)
                return
            done = await self._patiently(self.store.done_chunks, key)
            logger.warning("job %s: %d chunk(s) missing at the end; scoring them again", ref, chunks - len(done))
        else:
            await self._fail(key, f"chunks kept going missing after {MAX_SCORING_PASSES} passes")
            return
        if status == "completed":
            telemetry.JOBS.labels("completed").inc()
            finished = await _quietly(self.store.get(key))
            if finished is not None:
                telemetry.JOB_DURATION.observe(_seconds_between(finished["created_at"], finished["completed_at"]))
            logger.info("job %s completed", ref)

    async def _patiently(self, op: Callable[..., Awaitable[T]], *args: Any) -> T:
        """A worker's store call, retried while the store is unavailable (an outage, a full or
        read-only Redis) up to STORE_PATIENCE_S: a job waits for Redis instead of being dropped."""
        deadline = time.monotonic() + STORE_PATIENCE_S
        pause = 0.5
        while True:
            try:
                return await op(*args)
            except StoreUnavailable:
                if time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def _fail(self, key: str, error: str) -> None:
        if await self._patiently(self.store.finish, key, "failed", error) == "failed":
            telemetry.JOBS.labels("failed").inc()
            logger.warning("job %s failed: %s", job_ref(key), error)

    # ------------------------------------------------------------------ the reconciler

    async def _reconcile_forever(self) -> None:
        period = self.settings.job_reconcile_s
        while True:
            await asyncio.sleep(period)
            try:
                # one worker of the fleet per period; a job must be untouched for two periods
                if await self.store.lease("reconcile", max(1, period - 1)):
                    await self.reconcile(grace_s=2.0 * period)
            except StoreUnavailable:
                pass  # the next period tries again
            except Exception:
                logger.exception("job reconciler failed")

    async def reconcile(self, grace_s: float) -> dict[str, int]:
        """One pass over the live jobs (see the module docstring); returns what it did."""
        from serving.jobs.delivery import LIVE_STATES

        done = {"requeued": 0, "failed": 0, "forgotten": 0}
        now = time.time()
        for key in await self.store.live():
            record = await self.store.get(key)
            if record is None or record["status"] in TERMINAL:
                await self.store.forget(key)
                done["forgotten"] += 1
                continue
            if now - _epoch(record["updated_at"]) < grace_s:
                continue
            if await self.delivery.state(key) in LIVE_STATES:
                continue
            ref = job_ref(key)
            if record.get("accepted") != "1":
                await self._fail(key, "not accepted: the job store failed during submission")
                done["failed"] += 1
            elif int(record.get("attempts", "0")) >= self.settings.job_attempts:
                await self._fail(key, f"gave up after {record['attempts']} attempts")
                done["failed"] += 1
            else:
                await self.store.requeue(key)
                await self.delivery.enqueue(key, self.settings.job_ttl_s)
                telemetry.JOBS.labels("requeued").inc()
                logger.warning(
                    "job %s was %s without a queue entry (lost in a Redis outage): queued again", ref, record["status"]
                )
                done["requeued"] += 1
        return done


async def _quietly(awaitable: Awaitable[T]) -> T | None:
    """A best-effort store call: at most CLEANUP_S, and None if the store failed it."""
    try:
        return await asyncio.wait_for(awaitable, CLEANUP_S)
    except (StoreUnavailable, TimeoutError):
        return None


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _seconds_between(start: str, end: str) -> float:
    return max(0.0, _epoch(end) - _epoch(start))


__all__ = ["CsvRejected", "JobManager", "may_use", "public"]
