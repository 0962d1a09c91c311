"""Scoring jobs on a real fleet: Redis, two `bentoml serve` replicas, haproxy in front.

What a Kubernetes deployment of this service meets, reproduced with real processes
(harness/fleet.py): round-robin balancing over replicas, a replica killed outright, a rolling
restart under load, and the job store going away and coming back. Every call goes through
the load balancer unless a test talks to one replica on purpose.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest

from harness.data import customers_csv, submit_job
from harness.fleet import Fleet, wait_for_job
from harness.servers import metric
from models.schema import FEATURE_NAMES, json_customer

pytestmark = pytest.mark.integration  # real `bentoml serve` processes

ROWS = 200_000  # the largest file a job takes by default (BANKCHURN_MAX_CSV_ROWS)


@pytest.fixture(scope="module")
def fleet(trained, tmp_path_factory):
    with Fleet(tmp_path_factory.mktemp("fleet"), str(trained.model.tag), replicas=2) as f:
        yield f


@pytest.fixture(scope="module")
def big_file() -> bytes:
    return customers_csv(ROWS)


@pytest.fixture(scope="module")
def reference(fleet, dataset) -> np.ndarray:
    """/predict_batch's probabilities for the 10,000 dataset rows the test files repeat."""
    rows = [json_customer(r) for r in dataset[list(FEATURE_NAMES)].to_dict(orient="records")]
    r = httpx.post(f"{fleet.url}/predict_batch", json={"customers": rows}, timeout=120)
    assert r.status_code == 200, r.text[:500]
    return np.array([p["churn_probability"] for p in r.json()["predictions"]])


def check_result(url: str, job_id: str, rows: int, reference: np.ndarray) -> dict:
    """Every row exactly once, in order, each with /predict_batch's probability for it."""
    r = httpx.get(f"{url}/jobs/{job_id}/result", timeout=120)
    assert r.status_code == 200, r.text[:500]
    result = r.json()
    predictions = result["predictions"]
    assert result["errors"] == []
    assert [p["row"] for p in predictions] == list(range(1, rows + 1))
    assert [p["CustomerId"] for p in predictions] == [str(n) for n in range(1, rows + 1)]
    got = np.array([p["churn_probability"] for p in predictions])
    expected = reference[np.arange(rows) % len(reference)]
    # Chunks and /predict_batch are different batch sizes: ONNX Runtime may round the last bit.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert [p["will_churn"] for p in predictions] == list(expected >= result["threshold"])
    return result


def wait_rows(url: str, job_id: str, at_least: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
        if status["rows_done"] >= at_least or status["status"] == "completed":
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_every_replica_answers_for_every_job(fleet, reference):
    job_id = submit_job(fleet.url, customers_csv(12_000)).json()["job_id"]
    wait_for_job(fleet.url, job_id)
    bodies = set()
    for replica in fleet.replicas:
        status = httpx.get(f"{replica.url}/jobs/{job_id}", timeout=10)
        result = httpx.get(f"{replica.url}/jobs/{job_id}/result", timeout=60)
        assert (status.status_code, result.status_code) == (200, 200)
        assert status.json()["status"] == "completed"
        bodies.add(result.content)
    assert len(bodies) == 1, "the replicas answered different results"
    # and through the balancer, every call lands somewhere and finds the job
    codes = Counter(httpx.get(f"{fleet.url}/jobs/{job_id}", timeout=10).status_code for _ in range(20))
    assert codes == {200: 20}
    check_result(fleet.url, job_id, 12_000, reference)


def test_a_killed_workers_job_is_resumed_by_another(fleet, big_file, reference):
    job_id = submit_job(fleet.url, big_file).json()["job_id"]
    running = wait_rows(fleet.url, job_id, 20_000)
    assert running["status"] == "running", f"finished before it could be interrupted: {running}"
    slot = fleet.slot_of_pid(int(running["worker"].rsplit(":", 1)[1]))
    done_at_kill = running["rows_done"]
    killed_at = time.monotonic()
    fleet.kill(slot)  # kill -9, arbiter and worker: a pod lost with its node

    # Another worker takes it over once its heartbeat is stale, and resumes from the
    # checkpoint (rows_done does not go back to zero).
    deadline = killed_at + 60
    while True:
        status = httpx.get(f"{fleet.url}/jobs/{job_id}", timeout=10).json()
        if status["attempts"] >= 2 and status["status"] in ("running", "completed"):
            break
        assert time.monotonic() < deadline, f"not resumed within 60 s of the kill: {status}"
        time.sleep(0.2)
    resumed_after = time.monotonic() - killed_at
    assert status["rows_done"] >= done_at_kill - 10_000  # at most the chunk in flight was lost
    fleet.replace(slot)  # the Deployment starts a new pod meanwhile
    final = wait_for_job(fleet.url, job_id)
    completed_after = time.monotonic() - killed_at
    print(
        f"\n[kill -9] killed at {done_at_kill} rows; resumed by {status['worker']} {resumed_after:.1f} s later "
        f"(attempt {status['attempts']}); completed {completed_after:.1f} s after the kill"
    )
    assert final["rows_done"] == ROWS and final["attempts"] >= 2
    check_result(fleet.url, job_id, ROWS, reference)
    resumes = sum(metric(httpx.get(f"{r.url}/metrics").text, "bank_churn_job_resumes_total") for r in fleet.replicas)
    assert resumes >= 1


class SteadyLoad:
    """`connections` clients sending /predict through the balancer, back to back, in a thread."""

    def __init__(self, url: str, customers: list[dict], connections: int = 4):
        self.url, self.customers, self.connections = url, customers, connections
        self.outcomes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, k: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            i = k
            while not self._stop.is_set():
                i += self.connections
                try:
                    r = await client.post("/predict", json={"customer": self.customers[i % len(self.customers)]})
                    self.outcomes[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    self.outcomes[type(exc).__name__] += 1

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(k) for k in range(self.connections)))

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_rolling_restart_under_load_loses_no_request_and_no_job(fleet, big_file, reference, sample_rows):
    customers = [json_customer(r) for r in sample_rows]
    with SteadyLoad(fleet.url, customers) as load:
        jobs = [submit_job(fleet.url, big_file).json()["job_id"] for _ in range(2)]
        for job_id in jobs:
            wait_rows(fleet.url, job_id, 1)
        exits = [fleet.restart(slot) for slot in range(len(fleet.replicas))]
        finals = [wait_for_job(fleet.url, job_id) for job_id in jobs]
        time.sleep(1)
    total = sum(load.outcomes.values())
    print(
        f"\n[rolling restart] /predict: {total} requests {dict(load.outcomes)}; replicas exited "
        f"{[round(e, 1) for e in exits]} s after SIGTERM; jobs: attempts {[f['attempts'] for f in finals]}"
    )
    assert load.outcomes == {"200": total} and total > 100, load.outcomes
    for job_id in jobs:
        check_result(fleet.url, job_id, ROWS, reference)


def test_redis_outage_spares_online_traffic_and_jobs_resume(fleet, big_file, reference, sample_rows):
    job_id = submit_job(fleet.url, big_file).json()["job_id"]
    wait_rows(fleet.url, job_id, 10_000)
    fleet.redis.stop()
    try:
        customers = [json_customer(r) for r in sample_rows[:50]]
        online = [httpx.post(f"{fleet.url}/predict", json={"customer": c}, timeout=10).status_code for c in customers]
        ready = [httpx.get(f"{r.url}/readyz", timeout=5).status_code for r in fleet.replicas]
        started = time.monotonic()
        submit = submit_job(fleet.url, customers_csv(10))
        refused_in = time.monotonic() - started
        status = httpx.get(f"{fleet.url}/jobs/{job_id}", timeout=10)
        metrics = httpx.get(f"{fleet.replicas[0].url}/metrics", timeout=10).text
    finally:
        fleet.redis.start()
    assert online == [200] * len(customers)
    assert ready == [200] * len(fleet.replicas)
    assert submit.status_code == 503 and "unavailable" in submit.json()["error"], submit.text
    assert submit.headers.get("retry-after")
    assert refused_in < 5, f"POST /jobs took {refused_in:.1f} s to refuse"
    assert status.status_code == 503
    assert metric(metrics, "bank_churn_job_store_up") == 0
    assert metric(metrics, "bank_churn_job_store_errors_total") >= 1
    final = wait_for_job(fleet.url, job_id, timeout=180)
    assert final["rows_done"] == ROWS
    check_result(fleet.url, job_id, ROWS, reference)
    assert metric(httpx.get(f"{fleet.replicas[0].url}/metrics").text, "bank_churn_job_store_up") == 1
