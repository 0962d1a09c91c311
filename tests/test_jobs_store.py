"""The two job stores keep the same promises: checked here on the embedded store and on a
real redis-server, through the same table of cases."""

from __future__ import annotations

import asyncio
import time

import pytest

from harness.fleet import RedisServer
from harness.servers import free_port
from serving.jobs.redisconn import redis_client
from serving.jobs.store import (
    MemoryJobStore,
    RedisJobStore,
    StoreUnavailable,
    is_job_id,
    job_key,
    job_ref,
    new_job_id,
)

TTL = 120


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.integration)])
def make_store(request):
    if request.param == "embedded":
        return lambda: MemoryJobStore(TTL)
    url = request.getfixturevalue("redis_server").url  # started only for the Redis cases
    return lambda: RedisJobStore(redis_client(url), TTL)


def run(coro):
    return asyncio.run(coro)


def record(key: str, chunks: int = 2) -> dict[str, str]:
    return {
        "ref": job_ref(key),
        "status": "queued",
        "rows_total": str(chunks * 10),
        "rows_done": "0",
        "rows_failed": "0",
        "chunk_rows": "10",
        "chunks_total": str(chunks),
        "model_version": "bank_churn:v1",
        "created_at": "2026-01-01T00:00:00.000Z",
        "updated_at": "2026-01-01T00:00:00.000Z",
    }


def test_job_ids_are_unguessable_and_checked_and_stored_only_as_their_hash():
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(is_job_id(i) for i in ids)
    for bad in ("", "x" * 21, "x" * 23, "../../etc/passwd/xx", "a b" + "c" * 19, "é" * 22):
        assert not is_job_id(bad)
    job_id = next(iter(ids))
    key = job_key(job_id)
    assert len(key) == 64 and job_id not in key and job_ref(key) == key[:12]


async def _new(store, chunks: int = 2, upload: tuple[bytes, ...] = (b"chunk 0", b"chunk 1")) -> str:
    key = job_key(new_job_id())
    for index, blob in enumerate(upload):
        await store.stage_upload(key, index, blob)
    await store.create(key, record(key, chunks))
    await store.accept(key)
    return key


def test_a_job_is_scored_once_per_chunk_and_finishes_once(make_store):
    async def scenario():
        store = make_store()
        job = await _new(store)
        assert (await store.get(job))["status"] == "queued"
        assert (await store.get(job))["accepted"] == "1"
        assert [await store.upload_chunk(job, i) for i in (0, 1)] == [b"chunk 0", b"chunk 1"]
        assert await store.live() == [job]
        assert await store.start(job, "w1") == ("running", 1)
        assert await store.write_chunk(job, 0, b"p0", b"", 10, 0, "bank_churn:v1")
        # a straggler writing the same chunk again changes nothing
        assert not await store.write_chunk(job, 0, b"other", b"", 10, 0, "bank_churn:v1")
        assert await store.finish(job, "completed") == "incomplete"  # chunk 1 is missing
        assert await store.write_chunk(job, 1, b"p1", b'{"row":11}', 10, 1, "bank_churn:v1")
        assert await store.done_chunks(job) == {0, 1}
        assert await store.finish(job, "completed") == "completed"
        assert await store.finish(job, "failed", "late") == "completed"  # final: never changes again
        assert not await store.write_chunk(job, 1, b"p1", b"", 10, 0, "bank_churn:v1")
        assert await store.start(job, "w2") == ("completed", 0)
        got = await store.get(job)
        assert (got["rows_done"], got["rows_failed"], got["attempts"], got["worker"]) == ("20", "1", "1", "w1")
        assert await store.upload_chunk(job, 0) is None, "the upload must be deleted when the job ends"
        assert await store.live() == [], "a finished job leaves the live set"
        assert [await store.read_chunk(job, i, "p") for i in (0, 1)] == [b"p0", b"p1"]
        assert await store.read_chunk(job, 1, "e") == b'{"row":11}'
        assert await store.erase(job) and await store.get(job) is None, "erased: nothing is left"
        with pytest.raises(KeyError):
            await store.read_chunk(job, 0, "p")
        assert not await store.erase(job)
        await store.close()

    run(scenario())


def test_a_cancelled_job_refuses_further_chunks_and_its_partial_results_are_erased(make_store):
    async def scenario():
        store = make_store()
        job = await _new(store)
        await store.start(job, "w1")
        assert await store.write_chunk(job, 0, b"p0", b"", 10, 0, "bank_churn:v1")
        assert await store.cancel(job) == "cancelled"
        assert not await store.write_chunk(job, 1, b"p1", b"", 10, 0, "bank_churn:v1")
        with pytest.raises(KeyError):
            await store.read_chunk(job, 0, "p")
        assert (await store.get(job))["rows_done"] == "10", "the counts stay: they are not customer data"
        assert await store.cancel(job) == "cancelled"
        assert await store.finish(job, "completed") == "cancelled"
        assert await store.upload_chunk(job, 0) is None and await store.live() == []
        assert await store.start(job, "w2") == ("cancelled", 0)
        assert await store.cancel(job_key(new_job_id())) == "missing"
        await store.close()

    run(scenario())


def test_a_job_scored_by_another_model_version_starts_over(make_store):
    async def scenario():
        store = make_store()
        job = await _new(store)
        await store.start(job, "w1")
        assert await store.write_chunk(job, 0, b"p0", b"", 10, 0, "bank_churn:v1")
        assert not await store.write_chunk(job, 1, b"p1", b"", 10, 0, "bank_churn:v2"), "mixed model versions"
        await store.restart(job, "bank_churn:v2", "0.3")
        got = await store.get(job)
        assert (got["model_version"], got["threshold"], got["rows_done"]) == ("bank_churn:v2", "0.3", "0")
        assert await store.done_chunks(job) == set()
        await store.requeue(job)
        assert (await store.get(job))["status"] == "queued"
        assert await store.start(job, "w2") == ("running", 2)
        await store.close()

    run(scenario())


def test_finished_jobs_expire_after_the_ttl(redis_server):
    async def scenario():
        store = RedisJobStore(redis_client(redis_server.url), ttl_s=TTL)
        staged = job_key(new_job_id())
        await store.stage_upload(staged, 0, b"never created")
        assert 0 < await store.redis.ttl(store.keys(staged)[2]) <= 3600, "a staged upload expires soon"
        job = await _new(store, chunks=1, upload=(b"c0",))
        assert 0 < await store.redis.ttl(store.keys(job)[2]) <= TTL, "a created job's upload lives as long as the job"
        await store.start(job, "w1")
        await store.write_chunk(job, 0, b"p0", b"", 10, 0, "bank_churn:v1")
        await store.finish(job, "completed")
        ttls = [await store.redis.ttl(key) for key in store.keys(job)[:2]]
        assert all(0 < t <= TTL for t in ttls), ttls
        assert await store.redis.exists(store.keys(job)[2]) == 0
        await store.close()

    run(scenario())

    async def embedded_scenario():
        embedded = MemoryJobStore(ttl_s=1)
        return await _new(embedded), embedded

    job, embedded = run(embedded_scenario())
    time.sleep(1.1)
    assert run(embedded.get(job)) is None


def test_an_unreachable_redis_is_reported_quickly():
    async def scenario():
        store = RedisJobStore(redis_client(f"redis://127.0.0.1:{free_port()}/0"), TTL)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await store.get(job_key(new_job_id()))
        return time.monotonic() - started

    assert run(scenario()) < 3
