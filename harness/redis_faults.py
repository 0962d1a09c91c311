"""Redis faults, applied to a real redis-server under a real `bentoml serve`, and what the
service answered meanwhile: what the Redis fault tests assert and benchmarks.redis_faults
tabulates.

    full       maxmemory 1 byte (noeviction): every write refused with OOM
    read-only  the server becomes a replica of another one (REPLICAOF), as an old primary
               after a failover: every write refused with READONLY (writes made since the
               other server last synced are lost, as in a real failover)
    refusing   the server stopped (connections refused), then started again on its data
    hung       the process stopped with SIGSTOP (connections open, nothing answered)
    sleeping   DEBUG SLEEP: the server busy for the whole fault (needs --enable-debug-command)

`run_fault` submits a job big enough to be running when the fault starts, applies the fault,
probes POST /jobs, GET /jobs/{id} and POST /predict while it lasts, recovers, and waits for
every job to end: the outcome says what each probe got and how long it took, and how every
job ended.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.data import customers_csv, submit_job
from harness.fleet import RedisServer
from models.schema import EXAMPLE_CUSTOMER

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Probe:
    """One request made during a fault: its answer and how long it took."""

    what: str
    status: int | str  # an HTTP status, or the transport error's name
    seconds: float
    retry_after: str | None = None
    error: str = ""


@dataclass
class FaultOutcome:
    fault: str
    probes: list[Probe] = field(default_factory=list)
    running_at_fault: dict = field(default_factory=dict)  # the job submitted before the fault, as it began
    running_job: dict = field(default_factory=dict)  # the same job at the end
    rows_once: bool = False  # its result has every row exactly once
    live_after: int = -1  # jobs still queued or running once everything settled
    statuses_after: dict[str, int] = field(default_factory=dict)  # every job record in Redis, by status
    settle_s: float = 0.0  # recovery to every job ended

    def of(self, what: str) -> list[Probe]:
        return [p for p in self.probes if p.what == what]


class Faults:
    """The faults on one redis-server (`admin`: a client with every right on it)."""

    def __init__(self, redis: RedisServer, directory: Path):
        self.redis = redis
        self.directory = directory
        self._other: RedisServer | None = None
        self._sleeper: threading.Thread | None = None

    def apply(self, name: str, hold_s: float) -> None:
        admin = self.redis.client()
        if name == "full":
            admin.config_set("maxmemory", "1")
        elif name == "read-only":
            other = RedisServer(
                self.directory / "other",
                password=self.redis.password,
                username=self.redis.username,
                args=self.redis.args,
            ).start()
            self._other = other
            auth = {"masteruser": self.redis.username or "", "masterauth": self.redis.password or ""}
            for server in (other.client(), admin):
                for key, value in auth.items():
                    if value:
                        server.config_set(key, value)
            other.client().replicaof("127.0.0.1", self.redis.port)  # take a copy of the data...
            _wait(lambda: other.client().info("replication").get("master_link_status") == "up", 20)
            other.client().replicaof("NO", "ONE")  # ...promote it, and make the old primary its replica
            admin.replicaof("127.0.0.1", other.port)
            _wait(lambda: admin.info("replication").get("master_link_status") == "up", 20)
        elif name == "refusing":
            self.redis.stop()
        elif name == "hung":
            self.redis.pause()
        elif name == "sleeping":
            self._sleeper = threading.Thread(
                target=lambda: self.redis.client(timeout=hold_s + 30).execute_command("DEBUG", "SLEEP", hold_s),
                daemon=True,
            )
            self._sleeper.start()
        else:
            raise ValueError(name)

    def recover(self, name: str) -> None:
        if name == "full":
            self.redis.client().config_set("maxmemory", "0")
        elif name == "read-only":
            self.redis.client().replicaof("NO", "ONE")
            if self._other is not None:
                self._other.stop()
                self._other = None
        elif name == "refusing":
            self.redis.start()
        elif name == "hung":
            self.redis.resume()
        elif name == "sleeping" and self._sleeper is not None:
            self._sleeper.join(60)


FAULTS = ("full", "read-only", "refusing", "hung", "sleeping")


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)


def _timed(what: str, call: Callable[[], httpx.Response]) -> Probe:
    started = time.monotonic()
    try:
        r = call()
    except httpx.HTTPError as exc:
        return Probe(what, type(exc).__name__, time.monotonic() - started)
    error = ""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        error = r.json().get("error", "")
    return Probe(what, r.status_code, time.monotonic() - started, r.headers.get("retry-after"), error[:200])


def probe(url: str, job_id: str) -> list[Probe]:
    """POST /jobs (a small file), GET /jobs/{id}, POST /predict: answers and latencies."""
    small = customers_csv(20)
    return [
        _timed("POST /jobs", lambda: submit_job(url, small, timeout=30)),
        _timed("GET /jobs/{id}", lambda: httpx.get(f"{url}/jobs/{job_id}", timeout=30)),
        _timed("POST /predict", lambda: httpx.post(f"{url}/predict", json={"customer": EXAMPLE_CUSTOMER}, timeout=30)),
    ]


def job_records(redis: RedisServer) -> dict[str, int]:
    """Every job record in Redis, counted by status."""
    client = redis.client()
    counts: dict[str, int] = {}
    for key in client.scan_iter(match="bank_churn:job:*", count=1000):
        if key.endswith(b"}"):  # the record itself, not its :chunks or :upload
            status = (client.hget(key, "status") or b"?").decode()
            counts[status] = counts.get(status, 0) + 1
    return counts


def run_fault(
    name: str,
    url: str,
    redis: RedisServer,
    directory: Path,
    rows: int = 200_000,
    hold_s: float = 6.0,
    probes: int = 2,
    settle_timeout_s: float = 180.0,
) -> FaultOutcome:
    """See the module docstring. The caller's server must run job workers (jobs must end)."""
    outcome = FaultOutcome(name)
    r = submit_job(url, customers_csv(rows), timeout=120)
    r.raise_for_status()
    job_id = r.json()["job_id"]
    _wait(lambda: httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()["rows_done"] > 0, 60)
    faults = Faults(redis, directory)
    outcome.running_at_fault = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
    # The fault lasts at least as long as the probes can take (a round takes up to ~4 s against
    # a hung server): a self-ending fault (DEBUG SLEEP) must not end under the last probes.
    hold_s = max(hold_s, 4.0 * probes + 1.0)
    faults.apply(name, hold_s)
    started = time.monotonic()
    try:
        for _ in range(probes):
            outcome.probes += probe(url, job_id)
        time.sleep(max(0.0, hold_s - (time.monotonic() - started)))
    finally:
        faults.recover(name)
    recovered = time.monotonic()

    def settled() -> bool:
        status = httpx.get(f"{url}/jobs/{job_id}", timeout=10)
        if status.status_code != 200:
            return False
        assert "status" in status.json(), status.text
        return status.json()["status"] in TERMINAL and not redis.client().zcard("bank_churn:live")

    with contextlib.suppress(TimeoutError):
        _wait(settled, settle_timeout_s)
    outcome.settle_s = time.monotonic() - recovered
    outcome.running_job = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
    if outcome.running_job.get("status") == "completed":
        result = httpx.get(f"{url}/jobs/{job_id}/result", timeout=120).json()
        rows_seen = [p["row"] for p in result["predictions"]] + [e["row"] for e in result["errors"]]
        outcome.rows_once = sorted(rows_seen) == list(range(1, rows + 1))
    outcome.live_after = redis.client().zcard("bank_churn:live")
    outcome.statuses_after = job_records(redis)
    httpx.delete(f"{url}/jobs/{job_id}", timeout=10)  # erase it: the next fault starts clean
    return outcome
