"""Where jobs live: their record, their upload, and their scored chunks (the checkpoints).

Two stores with one interface and the same semantics:

- RedisJobStore (BANKCHURN_REDIS_URL): shared by every replica, so any pod answers for any
  job and a job outlives the pod that took it. Every state change is one Lua script, so
  concurrent writers (a resumed job and the straggler it replaced, a cancel racing the last
  chunk) cannot interleave: chunks are written once (the first write wins, and only while the
  job is live), a finished or cancelled job never changes again.
- MemoryJobStore: the embedded store of a single process (`make serve` without Redis). Jobs
  vanish with the process, and other replicas cannot see them: single replica only.

Keys of one job share a Redis hash tag ({job_id}), so the multi-key scripts also run on a
clustered Redis. A job's keys expire BANKCHURN_JOB_TTL_S after its last change.
"""

from __future__ import annotations

import logging
import secrets
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from typing import Any

from serving import telemetry

logger = logging.getLogger("bentoml.service.bank_churn.jobs")

ID_BYTES = 16  # 128 random bits: job ids are unguessable; knowing an id is the right to read the job
ID_LENGTH = 22  # len(secrets.token_urlsafe(16))
TERMINAL = frozenset({"completed", "failed", "cancelled"})
STATUSES = ("queued", "running", "completed", "failed", "cancelled")


def new_job_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


def is_job_id(text: str) -> bool:
    return len(text) == ID_LENGTH and all(c.isascii() and (c.isalnum() or c in "-_") for c in text)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StoreUnavailable(RuntimeError):
    """The job store cannot be reached (Redis down or unreachable)."""


class JobStore(ABC):
    """Records are flat dicts of strings (as a Redis hash holds them); see Record fields in
    manager.py. Every method may raise StoreUnavailable."""

    ttl_s: int

    @abstractmethod
    async def create(self, job_id: str, record: dict[str, str], upload: bytes) -> None: ...

    @abstractmethod
    async def get(self, job_id: str) -> dict[str, str] | None: ...

    @abstractmethod
    async def upload(self, job_id: str) -> bytes | None: ...

    @abstractmethod
    async def start(self, job_id: str, worker: str) -> tuple[str, int]:
        """Mark a live job running; returns (status, attempts) after the call. A finished
        job's status is returned unchanged (and attempts 0); ('missing', 0) if it is gone."""

    @abstractmethod
    async def requeue(self, job_id: str) -> None:
        """A running job handed back to the queue (its worker is stopping): queued again."""

    @abstractmethod
    async def done_chunks(self, job_id: str) -> set[int]: ...

    @abstractmethod
    async def restart(self, job_id: str, model_version: str, threshold: str) -> None:
        """Drop every checkpoint and score from the first chunk with this model."""

    @abstractmethod
    async def write_chunk(
        self, job_id: str, index: int, predictions: bytes, errors: bytes, done: int, failed: int, model_version: str
    ) -> bool:
        """Store a scored chunk once. False if the job is finished or cancelled, or is being
        scored by another model version (the write is refused), or the chunk was stored already."""

    @abstractmethod
    async def read_chunk(self, job_id: str, index: int, part: str) -> bytes:
        """A stored chunk's predictions (part 'p') or errors ('e'); KeyError if it is gone."""

    @abstractmethod
    async def finish(self, job_id: str, status: str, error: str = "") -> str:
        """Finish a live job (completed needs every chunk): delete its upload and start the
        expiry clock. Returns the job's status afterwards ('incomplete' if chunks are missing)."""

    async def cancel(self, job_id: str) -> str:
        return await self.finish(job_id, "cancelled", "cancelled by the client")

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

_FINISH = """
local record = redis.call('HMGET', KEYS[1], 'status', 'chunks_total')
local status = record[1]
if not status then return 'missing' end
if status == 'completed' or status == 'failed' or status == 'cancelled' then return status end
if ARGV[1] == 'completed' and redis.call('HLEN', KEYS[2]) < 2 * tonumber(record[2]) then return 'incomplete' end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2], 'completed_at', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
redis.call('DEL', KEYS[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return ARGV[1]
"""


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class RedisJobStore(JobStore):
    """Jobs in Redis, shared by every replica (see the module docstring)."""

    prefix = "bank_churn:job"

    def __init__(self, client: Any, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s
        self._errors = _redis_errors()
        self._start = client.register_script(_START)
        self._requeue = client.register_script(_REQUEUE)
        self._restart = client.register_script(_RESTART)
        self._write = client.register_script(_WRITE_CHUNK)
        self._finish = client.register_script(_FINISH)

    def keys(self, job_id: str) -> list[str]:
        base = f"{self.prefix}:{{{job_id}}}"
        return [base, f"{base}:chunks", f"{base}:upload"]

    async def _call(self, op: str, awaitable: Any) -> Any:
        try:
            result = await awaitable
        except self._errors as exc:
            if telemetry.job_store_error(op):
                logger.warning("job store: Redis unreachable (%s: %s)", type(exc).__name__, exc)
            raise StoreUnavailable(f"the job store (Redis) is unreachable: {type(exc).__name__}: {exc}") from exc
        telemetry.job_store_ok()
        return result

    async def create(self, job_id: str, record: dict[str, str], upload: bytes) -> None:
        rec, _, up = self.keys(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(rec, mapping=record).expire(rec, self.ttl_s).set(up, upload, ex=self.ttl_s)
        await self._call("create", pipe.execute())

    async def get(self, job_id: str) -> dict[str, str] | None:
        raw = await self._call("get", self.redis.hgetall(self.keys(job_id)[0]))
        return {k.decode(): v.decode() for k, v in raw.items()} or None

    async def upload(self, job_id: str) -> bytes | None:
        return await self._call("upload", self.redis.get(self.keys(job_id)[2]))

    async def start(self, job_id: str, worker: str) -> tuple[str, int]:
        status, attempts = await self._call(
            "start", self._start(keys=self.keys(job_id), args=[now_iso(), worker, self.ttl_s])
        )
        return status.decode() if isinstance(status, bytes) else status, int(attempts)

    async def requeue(self, job_id: str) -> None:
        await self._call("requeue", self._requeue(keys=self.keys(job_id)[:1], args=[now_iso()]))

    async def done_chunks(self, job_id: str) -> set[int]:
        fields = await self._call("done_chunks", self.redis.hkeys(self.keys(job_id)[1]))
        return {int(f[1:]) for f in fields if f.startswith(b"p")}

    async def restart(self, job_id: str, model_version: str, threshold: str) -> None:
        await self._call("restart", self._restart(keys=self.keys(job_id)[:2], args=[model_version, threshold]))

    async def write_chunk(
        self, job_id: str, index: int, predictions: bytes, errors: bytes, done: int, failed: int, model_version: str
    ) -> bool:
        args = [index, predictions, errors, done, failed, now_iso(), model_version, self.ttl_s]
        return await self._call("write_chunk", self._write(keys=self.keys(job_id)[:2], args=args)) == 1

    async def read_chunk(self, job_id: str, index: int, part: str) -> bytes:
        blob = await self._call("read_chunk", self.redis.hget(self.keys(job_id)[1], f"{part}{index}"))
        if blob is None:
            raise KeyError(f"job {job_id}: chunk {index} is missing (the job expired while it was read)")
        return blob

    async def finish(self, job_id: str, status: str, error: str = "") -> str:
        out = await self._call(
            "finish", self._finish(keys=self.keys(job_id), args=[status, now_iso(), self.ttl_s, error])
        )
        return out.decode() if isinstance(out, bytes) else out

    async def close(self) -> None:
        await self.redis.aclose()


# ------------------------------------------------------------------------------ embedded


class MemoryJobStore(JobStore):
    """Jobs in this process's memory, with the same semantics as RedisJobStore. Single
    process only: other replicas cannot see these jobs, and they vanish with the process."""

    def __init__(self, ttl_s: int):
        self.ttl_s = ttl_s
        self._records: dict[str, dict[str, str]] = {}
        self._uploads: dict[str, bytes] = {}
        self._chunks: dict[str, dict[int, tuple[bytes, bytes]]] = {}
        self._expires: dict[str, float] = {}

    def _live(self, job_id: str) -> dict[str, str] | None:
        self._purge()
        return self._records.get(job_id)

    def _touch(self, job_id: str) -> None:
        self._expires[job_id] = time.monotonic() + self.ttl_s

    def _purge(self) -> None:
        now = time.monotonic()
        for job_id in [j for j, t in self._expires.items() if t <= now]:
            for table in (self._records, self._uploads, self._chunks, self._expires):
                table.pop(job_id, None)

    async def create(self, job_id: str, record: dict[str, str], upload: bytes) -> None:
        self._purge()
        self._records[job_id] = dict(record)
        self._uploads[job_id] = upload
        self._touch(job_id)

    async def get(self, job_id: str) -> dict[str, str] | None:
        record = self._live(job_id)
        return dict(record) if record is not None else None

    async def upload(self, job_id: str) -> bytes | None:
        return self._uploads.get(job_id) if self._live(job_id) is not None else None

    async def start(self, job_id: str, worker: str) -> tuple[str, int]:
        record = self._live(job_id)
        if record is None:
            return "missing", 0
        if record["status"] in TERMINAL:
            return record["status"], 0
        stamp = now_iso()
        record.update(status="running", updated_at=stamp, worker=worker)
        record.setdefault("started_at", stamp)
        record["attempts"] = str(int(record.get("attempts", "0")) + 1)
        self._touch(job_id)
        return "running", int(record["attempts"])

    async def requeue(self, job_id: str) -> None:
        record = self._live(job_id)
        if record is not None and record["status"] == "running":
            record.update(status="queued", updated_at=now_iso())

    async def done_chunks(self, job_id: str) -> set[int]:
        return set(self._chunks.get(job_id, {}))

    async def restart(self, job_id: str, model_version: str, threshold: str) -> None:
        record = self._live(job_id)
        if record is None or record["status"] in TERMINAL:
            return
        self._chunks.pop(job_id, None)
        record.update(rows_done="0", rows_failed="0", model_version=model_version, threshold=threshold)

    async def write_chunk(
        self, job_id: str, index: int, predictions: bytes, errors: bytes, done: int, failed: int, model_version: str
    ) -> bool:
        record = self._live(job_id)
        if record is None or record["status"] in TERMINAL or record.get("model_version") != model_version:
            return False
        chunks = self._chunks.setdefault(job_id, {})
        if index in chunks:
            return False
        chunks[index] = (predictions, errors)
        record["rows_done"] = str(int(record.get("rows_done", "0")) + done)
        record["rows_failed"] = str(int(record.get("rows_failed", "0")) + failed)
        record["updated_at"] = now_iso()
        self._touch(job_id)
        return True

    async def read_chunk(self, job_id: str, index: int, part: str) -> bytes:
        chunk = self._chunks.get(job_id, {}).get(index)
        if chunk is None:
            raise KeyError(f"job {job_id}: chunk {index} is missing (the job expired while it was read)")
        return chunk[0] if part == "p" else chunk[1]

    async def finish(self, job_id: str, status: str, error: str = "") -> str:
        record = self._live(job_id)
        if record is None:
            return "missing"
        if record["status"] in TERMINAL:
            return record["status"]
        if status == "completed" and len(self._chunks.get(job_id, {})) < int(record["chunks_total"]):
            return "incomplete"
        stamp = now_iso()
        record.update(status=status, updated_at=stamp, completed_at=stamp)
        if error:
            record["error"] = error
        self._uploads.pop(job_id, None)
        self._touch(job_id)
        return status
