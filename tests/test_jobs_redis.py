"""Scoring jobs on a real redis-server set up as the manifests set it up: the ACL users of
deploy/base/redis/users.acl with passwords from deploy/redis-secret.sh (the service logs in
as `bank-churn`, KEDA as `keda`), then broken every way a bank's Redis breaks: full,
read-only after a failover, refusing, hung. A real `bentoml serve` with one job worker runs
the jobs; POST /jobs must answer 503 + Retry-After within 3 s (never 500, never held),
/predict must not notice, and every job must end (completed or failed) once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import time

import httpx
import psutil
import pytest
import redis as redis_sync

from harness.data import customers_csv, submit_job
from harness.fleet import manifest_redis, redis_secret, service_redis_url, wait_for_job
from harness.redis_faults import FAULTS, run_fault
from harness.servers import ServeProcess
from models.predictor import load_predictor
from serving.engine import Engine
from serving.jobs.manager import JobManager
from serving.jobs.redisconn import redis_client
from serving.jobs.store import RedisJobStore, StoreUnavailable, job_key, new_job_id
from serving.settings import Settings

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "test-admin-" + "x" * 20  # the tests' own user, to break the server with


@pytest.fixture(scope="module")
def secret() -> dict[str, str]:
    return redis_secret()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory, secret):
    server = manifest_redis(tmp_path_factory.mktemp("redis-acl"), secret, ADMIN_PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app_url(secret, redis_server) -> str:
    """The URL of the Secret, pointed at the test's server instead of the Service."""
    return service_redis_url(secret, redis_server.port)


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------ the manifest's ACL users


def test_the_acl_file_gives_each_user_only_what_it_needs(secret, redis_server, app_url):
    assert f"bank-churn:{secret['BANKCHURN_REDIS_URL'].split(':')[2].split('@')[0]}@" in secret["BANKCHURN_REDIS_URL"]
    app = redis_sync.Redis.from_url(app_url)
    app.set("bank_churn:probe", "1")
    with pytest.raises(redis_sync.exceptions.NoPermissionError):
        app.set("someone-else:key", "1")  # another application's keys
    with pytest.raises(redis_sync.exceptions.NoPermissionError):
        app.config_set("maxmemory", "1")
    with pytest.raises(redis_sync.exceptions.NoPermissionError):
        app.execute_command("FLUSHALL")
    keda = redis_sync.Redis(port=redis_server.port, username=secret["keda-username"], password=secret["keda-password"])
    assert keda.llen("saq:bank_churn:queued") == 0 and keda.llen("saq:bank_churn:active") == 0
    with pytest.raises(redis_sync.exceptions.NoPermissionError):
        keda.get("bank_churn:probe")
    anonymous = redis_sync.Redis(port=redis_server.port)
    for command in (("PING",), ("GET", "bank_churn:probe"), ("EVAL", "return 1", "0")):
        with pytest.raises(redis_sync.exceptions.AuthenticationError):  # NOAUTH: no Lua (CVE-2025-49844) either
            anonymous.execute_command(*command)
    probe = redis_sync.Redis(port=redis_server.port, username="probe", password="anything")
    assert probe.ping()  # the pod's probes
    with pytest.raises(redis_sync.exceptions.NoPermissionError):
        probe.get("bank_churn:probe")


def test_a_wrong_password_is_unavailable_quickly_and_never_shown(app_url):
    wrong = app_url.replace("bank-churn:", "bank-churn:WRONG", 1)

    async def scenario():
        store = RedisJobStore(redis_client(wrong), 120)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await store.get(job_key(new_job_id()))
        await store.close()
        return caught.value, time.monotonic() - started

    error, seconds = run(scenario())
    assert "refusing our credentials" in str(error) and "WRONG" not in str(error) and seconds < 3


# ------------------------------------------------------------------ a real service on it


@pytest.fixture(scope="module")
def service(trained, app_url):
    env = {
        "BANKCHURN_MODEL_TAG": str(trained.model.tag),
        "BANKCHURN_REDIS_URL": app_url,
        "BANKCHURN_JOB_WORKERS": "1",
        "BANKCHURN_JOB_CHUNK_ROWS": "2000",
        "BANKCHURN_JOB_HEARTBEAT_S": "3",
        "BANKCHURN_JOB_RECONCILE_S": "2",
    }
    with contextlib.closing(ServeProcess(env=env).start()) as proc:
        proc.wait_ready(180)
        yield proc


ServeProcess.close = ServeProcess.stop  # contextlib.closing


def test_only_the_models_columns_and_the_customer_id_reach_redis(service, redis_server):
    data = customers_csv(30).decode()  # the dataset's columns: RowNumber, Surname, ..., Exited
    surnames = [line.split(",")[2] for line in data.splitlines()[1:]]
    job_id = submit_job(service.url, data.encode()).json()["job_id"]
    status = wait_for_job(service.url, job_id)
    admin = redis_server.client()
    dump = b"".join(
        admin.dump(key) or b"" for key in admin.scan_iter(match="*", count=1000) if admin.type(key) != b"none"
    )
    assert job_id.encode() not in dump, "Redis never holds a job id, only its hash"
    assert not [s for s in surnames if s.encode() in dump], "no Surname reaches Redis"
    result = httpx.get(f"{service.url}/jobs/{job_id}/result").json()
    assert [p["row"] for p in result["predictions"]] == list(range(1, 31)) and status["rows_failed"] == 0
    assert httpx.delete(f"{service.url}/jobs/{job_id}").status_code == 200
    assert not list(admin.scan_iter(match=f"bank_churn:job:{{{job_key(job_id)}}}*")), "erased from Redis"


@pytest.mark.parametrize("fault", FAULTS)
def test_redis_faults_answer_503_at_once_and_every_job_ends(service, redis_server, tmp_path, fault):
    outcome = run_fault(fault, service.url, redis_server, tmp_path)
    print(f"\n[{fault}] " + "; ".join(f"{p.what} {p.status} {p.seconds:.2f}s" for p in outcome.probes))
    print(
        f"[{fault}] job: {outcome.running_job.get('status')}, settled {outcome.settle_s:.1f}s, {outcome.statuses_after}"
    )
    for p in outcome.of("POST /jobs"):
        assert p.status == 503 and p.retry_after and "unavailable" in p.error, p
        assert p.seconds < 3, p
    for p in outcome.of("GET /jobs/{id}"):
        assert p.status in (200, 503) and p.seconds < 3, p  # reads work on a full or read-only Redis
    for p in outcome.of("POST /predict"):
        assert p.status == 200 and p.seconds < 1, p
    assert outcome.running_at_fault["status"] in ("queued", "running"), "the fault came too late to matter"
    assert outcome.running_job["status"] == "completed" and outcome.rows_once, outcome.running_job
    assert outcome.live_after == 0 and set(outcome.statuses_after) <= {"completed", "failed", "cancelled"}
    assert service.proc.poll() is None


def test_a_worker_whose_arbiter_is_killed_exits(trained, app_url):
    env = {"BANKCHURN_MODEL_TAG": str(trained.model.tag), "BANKCHURN_REDIS_URL": app_url, "BANKCHURN_JOB_WORKERS": "1"}
    proc = ServeProcess(env=env).start()
    try:
        proc.wait_ready(180)
        (worker,) = psutil.Process(proc.proc.pid).children(recursive=True)
        os.kill(proc.proc.pid, signal.SIGKILL)  # the arbiter only: the worker is in a session of its own
        proc.proc.wait(10)
        killed = time.monotonic()
        gone = psutil.wait_procs([worker], timeout=30)[0]
        exited_after = time.monotonic() - killed
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
        proc.stop()
    print(f"\n[orphan] the worker exited {exited_after:.1f} s after its arbiter was killed")
    assert gone and exited_after < 10
    assert "bentoml serve process" in proc.log() and "is gone: stopping" in proc.log()


# ------------------------------------------------------------------ the reconciler, in process


@pytest.fixture(scope="module")
def engine(trained):
    return Engine(load_predictor(trained.model), Settings())


async def _manager(engine, url: str) -> JobManager:
    # Database 1: the module's `bentoml serve` (database 0) must not take these jobs, nor its
    # reconciler reconcile them.
    url = url.rsplit("/", 1)[0] + "/1"
    manager = JobManager(engine, Settings(redis_url=url, job_workers=0, job_chunk_rows=10))
    await manager.delivery.start()  # the queue only: no worker takes the jobs
    return manager


def test_the_reconciler_requeues_lost_jobs_and_fails_unaccepted_ones(engine, app_url):
    async def scenario():
        manager = await _manager(engine, app_url)
        store, delivery = manager.store, manager.delivery
        try:
            queue = delivery.queue

            async def lose_queue_entry(job_id: str) -> None:  # as a Redis that lost saq's writes
                saq_id = queue.job_id(job_key(job_id))
                await queue.redis.delete(saq_id)
                await queue.redis.zrem(queue.namespace("incomplete"), saq_id)
                await queue.redis.lrem(queue.namespace("queued"), 0, saq_id)

            lost = (await manager.submit(io.BytesIO(customers_csv(25)), "a.csv", "alice"))["job_id"]
            await lose_queue_entry(lost)
            unaccepted = (await manager.submit(io.BytesIO(customers_csv(5)), "b.csv", ""))["job_id"]
            await store.redis.hset(store.keys(job_key(unaccepted))[0], "accepted", "0")
            await lose_queue_entry(unaccepted)
            queued = (await manager.submit(io.BytesIO(customers_csv(5)), "c.csv", ""))["job_id"]
            assert await manager.reconcile(grace_s=3600) == {"requeued": 0, "failed": 0, "forgotten": 0}
            done = await manager.reconcile(grace_s=0)
            assert done == {"requeued": 1, "failed": 1, "forgotten": 0}, done
            assert await delivery.state(job_key(lost)) == "queued"
            assert (await store.get(job_key(lost)))["status"] == "queued"
            failed = await store.get(job_key(unaccepted))
            assert failed["status"] == "failed" and "not accepted" in failed["error"]
            assert await delivery.state(job_key(queued)) == "queued", "a job with its queue entry is left alone"
            for job_id in (lost, unaccepted, queued):
                await manager.cancel(job_id)
                await manager.erase(job_id)
        finally:
            await manager.stop()

    run(scenario())


def test_a_job_that_ends_with_a_chunk_missing_scores_it_again(engine, app_url):
    """Redis can lose a chunk's write (a crash inside its fsync second, a failover): the run
    that finds a chunk missing at the end scores it again instead of leaving the job running."""

    async def scenario():
        manager = await _manager(engine, app_url)
        store = manager.store
        try:
            job_id = (await manager.submit(io.BytesIO(customers_csv(35)), "c.csv", ""))["job_id"]
            key = job_key(job_id)
            real_done_chunks = store.done_chunks
            calls = 0

            async def losing(k):  # the first look sees chunk 1 as done; its write then "is lost"
                nonlocal calls
                calls += 1
                return (await real_done_chunks(k)) | ({1} if calls == 1 else set())

            store.done_chunks = losing
            await manager.run(key)
            status = await store.get(key)
            assert status["status"] == "completed" and calls >= 2, status
            rows = []
            async for part in manager.result_json(status, job_id):
                rows.append(part)
            import orjson

            result = orjson.loads(b"".join(rows))
            assert [p["row"] for p in result["predictions"]] == list(range(1, 36))
            await manager.erase(job_id)
        finally:
            await manager.stop()

    run(scenario())
