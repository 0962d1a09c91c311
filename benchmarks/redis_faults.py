"""Redis-fault table: what /jobs and /predict answer, and how fast, while the job store's
Redis is full, read-only, refusing, hung or busy; and how the jobs end once it recovers.

    python -m benchmarks.redis_faults
    python -m benchmarks.redis_faults --rows 200000 --hold 6 --probes 3

Real parts only: redis-server with the manifest's ACL users (deploy/redis-secret.sh; the
service logs in as `bank-churn`), one `bentoml serve service:BankChurn` with one job worker.
For each fault (harness/redis_faults.py): a --rows job is submitted and running, the fault
is applied for --hold seconds, POST /jobs (a 20-row file), GET /jobs/{id} and POST /predict
are probed --probes times meanwhile, Redis recovers, and the table says what each probe got
(status, slowest latency), how the running job ended, and how long after the recovery every
job had ended. Figures from a shared machine are noisy. Writes reports/bench/redis_faults.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from benchmarks.http import run_meta
from harness.fleet import manifest_redis, redis_secret, service_redis_url
from harness.redis_faults import FAULTS, FaultOutcome, run_fault
from harness.servers import ROOT, ServeProcess

ADMIN = "bench-admin-" + "a" * 20  # the benchmark's own user, to break the server with


def row(outcome: FaultOutcome) -> str:
    def cell(what: str) -> str:
        probes = outcome.of(what)
        statuses = "/".join(sorted({str(p.status) for p in probes}))
        retry = " +Retry-After" if probes and all(p.retry_after for p in probes) else ""
        return f"{statuses}{retry}, ≤ {max(p.seconds for p in probes):.2f} s"

    job = outcome.running_job.get("status", "?")
    every = ", ".join(f"{n} {s}" for s, n in sorted(outcome.statuses_after.items()))
    return (
        f"| {outcome.fault} | {cell('POST /jobs')} | {cell('GET /jobs/{id}')} | {cell('POST /predict')} | "
        f"{job} (every row once: {outcome.rows_once}) | {every}; live {outcome.live_after} | {outcome.settle_s:.1f} |"
    )


def markdown(outcomes: list[FaultOutcome], meta: dict) -> str:
    return "\n".join(
        [
            f"Machine: {meta['machine']} (shared, noisy); commit {meta['commit']}; {meta['date']}. "
            f"Command: `{meta['command']}`",
            "",
            f"A {meta['rows']:,}-row job running when each fault begins; the fault held "
            f"{max(meta['hold'], 4.0 * meta['probes'] + 1.0):g} s (at least --hold, long enough for the probes); "
            f"{meta['probes']} probes of each kind during it. Redis: the manifest's ACL users "
            "(deploy/redis-secret.sh), one `bentoml serve` with one job worker, BANKCHURN_REDIS_TIMEOUT_S=1.",
            "",
            "| fault | POST /jobs | GET /jobs/{id} | POST /predict | the running job | every job record after | "
            "settled after recovery, s |",
            "|---|---|---|---|---|---|---:|",
            *(row(o) for o in outcomes),
            "",
            "full: maxmemory 1 byte (OOM on every write); read-only: the server made a replica of a copy of itself "
            "(REPLICAOF), writes since the copy lost as in a failover; refusing: stopped, then started on its data; "
            "hung: SIGSTOP, then SIGCONT; sleeping: DEBUG SLEEP for the whole fault.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--hold", type=float, default=6.0)
    p.add_argument("--probes", type=int, default=3)
    p.add_argument("--faults", nargs="*", default=list(FAULTS), choices=FAULTS)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    a = p.parse_args(argv)
    meta = run_meta("redis_faults", argv, rows=a.rows, hold=a.hold, probes=a.probes)
    print(meta["machine"], "| commit", meta["commit"])
    directory = Path(tempfile.mkdtemp(prefix="bench-redis-faults-"))
    secret = redis_secret()
    redis = manifest_redis(directory, secret, ADMIN)
    url = service_redis_url(secret, redis.port)
    env = {
        "BANKCHURN_REDIS_URL": url,
        "BANKCHURN_JOB_WORKERS": "1",
        "BANKCHURN_JOB_CHUNK_ROWS": "2000",
        "BANKCHURN_JOB_HEARTBEAT_S": "3",
        "BANKCHURN_JOB_RECONCILE_S": "2",
    }
    server = ServeProcess(env=env).start()
    outcomes = []
    try:
        server.wait_ready(180)
        for fault in a.faults:
            print(f"{fault} ...", flush=True)
            outcome = run_fault(fault, server.url, redis, directory / fault, a.rows, a.hold, a.probes)
            outcomes.append(outcome)
            print(" ", row(outcome))
    finally:
        server.stop()
        redis.stop()
    table = markdown(outcomes, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "redis_faults.md").write_text(table + "\n")
    (a.out / "redis_faults.json").write_text(
        json.dumps({"meta": meta, "outcomes": [dataclasses.asdict(o) for o in outcomes]}, indent=2)
    )
    print()
    print(table)
    ok = all(
        all(p.status == 503 and p.retry_after and p.seconds < 3 for p in o.of("POST /jobs"))
        and all(p.status == 200 for p in o.of("POST /predict"))
        and o.running_job.get("status") == "completed"
        and o.rows_once
        and o.live_after == 0
        for o in outcomes
    )
    print(f"\n{'PASS' if ok else 'FAIL'}: POST /jobs 503 + Retry-After within 3 s, /predict 200, every job ended")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
