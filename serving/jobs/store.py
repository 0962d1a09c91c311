"""Where jobs live: their record, their reduced upload, and their scored chunks (checkpoints).

Two stores with one interface and the same semantics:

- RedisJobStore (BANKCHURN_REDIS_URL): shared by every replica, so any pod answers for any
  job and a job outlives the pod that took it. Every state change is one Lua script or one
  transaction, so concurrent writers (a resumed job and the straggler it replaced, a cancel
  racing the last chunk) cannot interleave: chunks are written once (the first write wins,
  and only while the job is live), a finished or cancelled job never changes again.
- MemoryJobStore: the embedded store of a single process (`make serve` without Redis). Jobs
  vanish with the process, and other replicas cannot see them: single replica only. Reduced
  uploads wait in a temporary file, not in memory.

A job is stored under its *key*, the SHA-256 of its id (job_key): the id is a bearer secret
(when authentication is off, knowing it is the right to read the job), so neither Redis nor
the logs hold it. Logs name a job by its *ref*, the key's first 12 hex digits (job_ref):
enough to follow one job through the logs, useless to read it.

What is kept: the record (status, counts, owner, file name), the reduced upload (row
numbers, CustomerId and the model's feature columns only) until the job ends, and the
result chunks until BANKCHURN_JOB_TTL_S after the job's last change. A live job is also in
a set of live jobs (`bank_churn:live`), which the reconciler walks (manager.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import tempfile
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from typing import IO, Any

from serving import telemetry
from serving.jobs.redisconn import describe, store_errors

logger = logging.getLogger("bentoml.service.bank_churn.jobs")

ID_BYTES = 16  # 128 random bits: job ids are unguessable
ID_LENGTH = 22  # len(secrets.token_urlsafe(16))
REF_LENGTH = 12
TERMINAL = frozenset({"completed", "failed", "cancelled"})
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
# A reduced upload staged before its job exists (the job's creation failed, or is slow)
# expires after this, not after the job TTL: customer data left behind by a failed submission
# goes soon.
STAGED_TTL_S = 3600


def new_job_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


def is_job_id(text: str) -> bool:
    return len(text) == ID_LENGTH and all(c.isascii() and (c.isalnum() or c in "-_") for c in text)


def job_key(job_id: str) -> str:
    """Where a job is stored: the SHA-256 of its id, in hex (see the module docstring)."""
    return hashlib.sha256(job_id.encode("utf-8", "surrogateescape")).hexdigest()


def job_ref(key: str) -> str:
    """How logs name a job: not reversible to its id."""
    return key[:REF_LENGTH]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StoreUnavailable(RuntimeError):
    """The job store cannot serve the call: Redis unreachable, hung, full or read-only."""


class JobStore(ABC):
    """Records are flat dicts of strings (as a Redis hash holds them); see the record fields
    in manager.py. Every method may raise StoreUnavailable."""

    ttl_s: int

    @abstractmethod
    async def stage_upload(self, key: str, index: int, blob: bytes) -> None:
        """Store chunk `index` of a reduced upload, ahead of create() (expires after STAGED_TTL_S)."""

    @abstractmethod
    async def create(self, key: str, record: dict[str, str]) -> None:
        """The job's record, live; its staged upload now lives as long as the job."""

    @abstractmethod
    async def accept(self, key: str) -> None:
        """Mark a created job accepted: the client was (about to be) told 202."""

    @abstractmethod
    async def get(self, key: str) -> dict[str, str] | None: ...

    @abstractmethod
    async def upload_chunk(self, key: str, index: int) -> bytes | None:
        """Chunk `index` of the reduced upload; None once the job has ended (or expired)."""

    @abstractmethod
    async def discard_upload(self, key: str) -> None:
        """Drop a staged upload whose job was never created."""

    @abstractmethod
    async def start(self, key: str, worker: str) -> tuple[str, int]:
        """Mark a live job running; returns (status, attempts) after the call. A finished
        job's status is returned unchanged (and attempts 0); ('missing', 0) if it is gone."""

    @abstractmethod
    async def requeue(self, key: str) -> None:
        """A running job handed back to the queue (its worker is stopping): queued again."""

    @abstractmethod
    async def done_chunks(self, key: str) -> set[int]: ...

    @abstractmethod
    async def restart(self, key: str, model_version: str, threshold: str) -> None:
        """Drop every checkpoint and score from the first chunk with this model."""

    @abstractmethod
    async def write_chunk(
        self, key: str, index: int, predictions: bytes, errors: bytes, done: int, failed: int, model_version: str
    ) -> bool:
        """Store a scored chunk once. False if the job is finished or cancelled, or is being
        scored by another model version (the write is refused), or the chunk was stored already."""

    @abstractmethod
    async def read_chunk(self, key: str, index: int, part: str) -> bytes:
        """A stored chunk's predictions (part 'p') or errors ('e'); KeyError if it is gone."""

    @abstractmethod
    async def finish(self, key: str, status: str, error: str = "") -> str:
        """Finish a live job (completed needs every chunk): delete its upload, leave the live
        set, start the expiry clock. Returns the job's status afterwards ('incomplete' if
        chunks are missing, 'missing' if there is no such job)."""

    @abstractmethod
    async def cancel(self, key: str) -> str:
        """Cancel a live job and erase what it scored so far (its record stays, cancelled).
        Returns the status afterwards, as finish() does."""

    @abstractmethod
    async def erase(self, key: str) -> bool:
        """Delete everything of a job (record, upload, results). False if there was nothing."""

    @abstractmethod
    async def live(self) -> list[str]:
        """Keys of the jobs created and not yet finished."""

    @abstractmethod
    async def forget(self, key: str) -> None:
        """Drop a key from the live set (its job expired or ended)."""

    async def lease(self, name: str, seconds: int) -> bool:
        """True for one caller per `seconds` across the fleet (a periodic task's turn)."""
        return True

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------------------ Redis

_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status == 'completed' or status == 'failed' or status == 'cancelled' then return {status, 0} end
redis.call('HSET', KEYS[1], 'status', 'running', 'updated_at', ARGV[1], 'worker', ARGV[2])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return {'running', attempts}
"""

_ACCEPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'accepted', '1') end
return 1
"""

_REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'updated_at', ARGV[1])
end
return 1
"""

_RESTART = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'completed' or status == 'failed' or status == 'cancelled' then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'rows_done', 0, 'rows_failed', 0, 'model_version', ARGV[1], 'threshold', ARGV[2])
return 1
"""

_WRITE_CHUNK = """
local record = redis.call('HMGET', KEYS[1], 'status', 'model_version')
local status = record[1]
if not status or status == 'completed' or status == 'failed' or status == 'cancelled' then return -1 end
if record[2] ~= ARGV[7] then return -2 end
if redis.call('HSETNX', KEYS[2], 'p' .. ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'e' .. ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'rows_done', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'rows_failed', ARGV[5])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[8])
return 1
"""

# KEYS: record, chunks, upload, live set. ARGV: status, stamp, ttl, error, key, erase results.
_FINISH = """
local record = redis.call('HMGET', KEYS[1], 'status', 'chunks_total')
local status = record[1]
if not status then redis.call('ZREM', KEYS[4], ARGV[5]) return 'missing' end
if status == 'completed' or status == 'failed' or status == 'cancelled' then return status end
if ARGV[1] == 'completed' and redis.call('HLEN', KEYS[2]) < 2 * tonumber(record[2]) then return 'incomplete' end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2], 'completed_at', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
if ARGV[6] == '1' then redis.call('DEL', KEYS[2]) end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return ARGV[1]
"""


class RedisJobStore(JobStore):
    """Jobs in Redis, shared by every replica (see the module docstring)."""

    prefix = "bank_churn:job"
    live_key = "bank_churn:live"

    def __init__(self, client: Any, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s
        self._errors = store_errors()
        self._start = client.register_script(_START)
        self._accept = client.register_script(_ACCEPT)
        self._requeue = client.register_script(_REQUEUE)
        self._restart = client.register_script(_RESTART)
        self._write = client.register_script(_WRITE_CHUNK)
        self._finish = client.register_script(_FINISH)

    def keys(self, key: str) -> list[str]:
        base = f"{self.prefix}:{{{key}}}"
        return [base, f"{base}:chunks", f"{base}:upload"]

    async def _call(self, op: str, awaitable: Any) -> Any:
        try:
            result = await awaitable
        except self._errors as exc:
            reason = describe(exc)
            if telemetry.job_store_error(op):
                logger.warning("job store: Redis is %s (%s during %s)", reason, type(exc).__name__, op)
            raise StoreUnavailable(f"the job store (Redis) is {reason}") from exc
        telemetry.job_store_ok()
        return result

    async def stage_upload(self, key: str, index: int, blob: bytes) -> None:
        upload = self.keys(key)[2]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(upload, str(index), blob).expire(upload, STAGED_TTL_S)
        await self._call("stage_upload", pipe.execute())

    async def create(self, key: str, record: dict[str, str]) -> None:
        rec, _, up = self.keys(key)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(rec, mapping=record).expire(rec, self.ttl_s).expire(up, self.ttl_s)
        pipe.zadd(self.live_key, {key: time.time()})
        await self._call("create", pipe.execute())

    async def accept(self, key: str) -> None:
        await self._call("accept", self._accept(keys=self.keys(key)[:1]))

    async def get(self, key: str) -> dict[str, str] | None:
        raw = await self._call("get", self.redis.hgetall(self.keys(key)[0]))
        return {k.decode(): v.decode() for k, v in raw.items()} or None

    async def upload_chunk(self, key: str, index: int) -> bytes | None:
        return await self._call("upload_chunk", self.redis.hget(self.keys(key)[2], str(index)))

    async def discard_upload(self, key: str) -> None:
        await self._call("discard_upload", self.redis.delete(self.keys(key)[2]))

    async def start(self, key: str, worker: str) -> tuple[str, int]:
        status, attempts = await self._call(
            "start", self._start(keys=self.keys(key), args=[now_iso(), worker, self.ttl_s])
        )
        return status.decode() if isinstance(status, bytes) else status, int(attempts)

    async def requeue(self, key: str) -> None:
        await self._call("requeue", self._requeue(keys=self.keys(key)[:1], args=[now_iso()]))

    async def done_chunks(self, key: str) -> set[int]:
        fields = await self._call("done_chunks", self.redis.hkeys(self.keys(key)[1]))
        return {int(f[1:]) for f in fields if f.startswith(b"p")}

    async def restart(self, key: str, model_version: str, threshold: str) -> None:
        await self._call("restart", self._restart(keys=self.keys(key)[:2], args=[model_version, threshold]))

    async def write_chunk(
        self, key: str, index: int, predictions: bytes, errors: bytes, done: int, failed: int, model_version: str
    ) -> bool:
        args = [index, predictions, errors, done, failed, now_iso(), model_version, self.ttl_s]
        return await self._call("write_chunk", self._write(keys=self.keys(key)[:2], args=args)) == 1

    async def read_chunk(self, key: str, index: int, part: str) -> bytes:
        blob = await self._call("read_chunk", self.redis.hget(self.keys(key)[1], f"{part}{index}"))
        if blob is None:
            raise KeyError(f"job {job_ref(key)}: chunk {index} is missing (the job expired while it was read)")
        return blob

    async def _end(self, key: str, status: str, error: str, erase_results: bool) -> str:
        args = [status, now_iso(), self.ttl_s, error, key, "1" if erase_results else "0"]
        out = await self._call("finish", self._finish(keys=[*self.keys(key), self.live_key], args=args))
        return out.decode() if isinstance(out, bytes) else out

    async def finish(self, key: str, status: str, error: str = "") -> str:
        return await self._end(key, status, error, erase_results=False)

    async def cancel(self, key: str) -> str:
        return await self._end(key, "cancelled", "cancelled by the client", erase_results=True)

    async def erase(self, key: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(*self.keys(key)).zrem(self.live_key, key)
        deleted, _ = await self._call("erase", pipe.execute())
        return deleted > 0

    async def live(self) -> list[str]:
        return [k.decode() for k in await self._call("live", self.redis.zrange(self.live_key, 0, -1))]

    async def forget(self, key: str) -> None:
        await self._call("forget", self.redis.zrem(self.live_key, key))

    async def lease(self, name: str, seconds: int) -> bool:
        return bool(await self._call("lease", self.redis.set(f"bank_churn:lease:{name}", "1", nx=True, ex=seconds)))

    async def close(self) -> None:
        await self.redis.aclose()


# ------------------------------------------------------------------------------ embedded


class _StagedUpload:
    """A reduced upload's chunks in an anonymous temporary file (never in memory)."""

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(prefix="bank-churn-job-")  # noqa: SIM115 - closed in close()
        self.chunks: dict[int, tuple[int, int]] = {}
        self.size = 0

    def add(self, index: int, blob: bytes) -> None:
        self.file.seek(self.size)
        self.file.write(blob)
        self.chunks[index] = (self.size, len(blob))
        self.size += len(blob)

    def read(self, index: int) -> bytes | None:
        if index not in self.chunks:
            return None
        offset, length = self.chunks[index]
        self.file.seek(offset)
        return self.file.read(length)

    def close(self) -> None:
        self.file.close()


class MemoryJobStore(JobStore):
    """Jobs in this process, with the same semantics as RedisJobStore. Single process only:
    other replicas cannot see these jobs, and they vanish with the process."""

    def __init__(self, ttl_s: int):
        self.ttl_s = ttl_s
        self._records: dict[str, dict[str, str]] = {}
        self._uploads: dict[str, _StagedUpload] = {}
        self._chunks: dict[str, dict[int, tuple[bytes, bytes]]] = {}
        self._expires: dict[str, float] = {}
        self._lock = asyncio.Lock()  # file access runs on threads; one at a time

    def _live(self, key: str) -> dict[str, str] | None:
        self._purge()
        return self._records.get(key)

    def _touch(self, key: str) -> None:
        self._expires[key] = time.monotonic() + self.ttl_s

    def _drop_upload(self, key: str) -> None:
        upload = self._uploads.pop(key, None)
        if upload is not None:
            upload.close()

    def _purge(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._expires.items() if t <= now]:
            self._drop_upload(key)
            for table in (self._records, self._chunks, self._expires):
                table.pop(key, None)

    async def stage_upload(self, key: str, index: int, blob: bytes) -> None:
        upload = self._uploads.setdefault(key, _StagedUpload())
        if key not in self._records:
            self._expires[key] = time.monotonic() + STAGED_TTL_S
        async with self._lock:
            await asyncio.to_thread(upload.add, index, blob)

    async def create(self, key: str, record: dict[str, str]) -> None:
        self._purge()
        self._records[key] = dict(record)
        self._touch(key)

    async def accept(self, key: str) -> None:
        record = self._live(key)
        if record is not None:
            record["accepted"] = "1"

    async def get(self, key: str) -> dict[str, str] | None:
        record = self._live(key)
        return dict(record) if record is not None else None

    async def upload_chunk(self, key: str, index: int) -> bytes | None:
        upload = self._uploads.get(key) if self._live(key) is not None else None
        if upload is None:
            return None
        async with self._lock:
            return await asyncio.to_thread(upload.read, index)

    async def discard_upload(self, key: str) -> None:
        self._drop_upload(key)

    async def start(self, key: str, worker: str) -> tuple[str, int]:
        record = self._live(key)
        if record is None:
            return "missing", 0
        if record["status"] in TERMINAL:
            return record["status"], 0
        stamp = now_iso()
        record.update(status="running", updated_at=stamp, worker=worker)
        record.setdefault("started_at", stamp)
        record["attempts"] = str(int(record.get("attempts", "0")) + 1)
        self._touch(key)
        return "running", int(record["attempts"])

    async def requeue(self, key: str) -> None:
        record = self._live(key)
        if record is not None and record["status"] == "running":
            record.update(status="queued", updated_at=now_iso())

    async def done_chunks(self, key: str) -> set[int]:
        return set(self._chunks.get(key, {}))

    async def restart(self, key: str, model_version: str, threshold: str) -> None:
        record = self._live(key)
        if record is None or record["status"] in TERMINAL:
            return
        self._chunks.pop(key, None)
        record.update(rows_done="0", rows_failed="0", model_version=model_version, threshold=threshold)

    async def write_chunk(
        self, key: str, index: int, predictions: bytes, errors: bytes, done: int, failed: int, model_version: str
    ) -> bool:
        record = self._live(key)
        if record is None or record["status"] in TERMINAL or record.get("model_version") != model_version:
            return False
        chunks = self._chunks.setdefault(key, {})
        if index in chunks:
            return False
        chunks[index] = (predictions, errors)
        record["rows_done"] = str(int(record.get("rows_done", "0")) + done)
        record["rows_failed"] = str(int(record.get("rows_failed", "0")) + failed)
        record["updated_at"] = now_iso()
        self._touch(key)
        return True

    async def read_chunk(self, key: str, index: int, part: str) -> bytes:
        chunk = self._chunks.get(key, {}).get(index)
        if chunk is None:
            raise KeyError(f"job {job_ref(key)}: chunk {index} is missing (the job expired while it was read)")
        return chunk[0] if part == "p" else chunk[1]

    async def _end(self, key: str, status: str, error: str, erase_results: bool) -> str:
        record = self._live(key)
        if record is None:
            return "missing"
        if record["status"] in TERMINAL:
            return record["status"]
        if status == "completed" and len(self._chunks.get(key, {})) < int(record["chunks_total"]):
            return "incomplete"
        stamp = now_iso()
        record.update(status=status, updated_at=stamp, completed_at=stamp)
        if error:
            record["error"] = error
        if erase_results:
            self._chunks.pop(key, None)
        self._drop_upload(key)
        self._touch(key)
        return status

    async def finish(self, key: str, status: str, error: str = "") -> str:
        return await self._end(key, status, error, erase_results=False)

    async def cancel(self, key: str) -> str:
        return await self._end(key, "cancelled", "cancelled by the client", erase_results=True)

    async def erase(self, key: str) -> bool:
        existed = self._live(key) is not None
        self._drop_upload(key)
        for table in (self._records, self._chunks, self._expires):
            table.pop(key, None)
        return existed

    async def live(self) -> list[str]:
        self._purge()
        return [k for k, r in self._records.items() if r["status"] not in TERMINAL]

    async def forget(self, key: str) -> None:
        return None

    async def close(self) -> None:
        for key in list(self._uploads):
            self._drop_upload(key)
