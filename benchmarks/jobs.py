"""Scoring-job benchmark: throughput, /predict latency while a job runs, resumption after a kill.

    python -m benchmarks.jobs                 # or: make bench
    python -m benchmarks.jobs --rows 50000 --duration 5

Real parts only: redis-server, `bentoml serve service:BankChurn` with BANKCHURN_REDIS_URL,
the dataset's customers repeated into a CSV (harness.data.customers_csv).

1. Throughput: one server (one job worker) pinned to CPU 0, Redis on CPU 1; a --rows file
   submitted and scored; rows/s from the job's start to its completion (and from submission).
2. /predict while a job runs, the worst case of one process doing both (`make serve`, or a
   pod with job workers on): wrk at 50 connections for --duration s on CPU 1 against the
   server on CPU 0, without a job, then while jobs run in the same process. In the shipped
   Kubernetes layout the API pods run no jobs (BANKCHURN_JOB_WORKERS=0), so their /predict
   is the "without" figure.
3. Resumption: two servers (CPU 0 and CPU 1), a job killed with its server (kill -9) once a
   fifth of it is scored; the time until the other worker runs it again (heartbeat
   BANKCHURN_JOB_HEARTBEAT_S, default 10 s, + the sweep), and until it completes.

Prints the figures and writes reports/bench/jobs.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil

from benchmarks.http import run_meta, run_wrk, write_script
from harness.data import customers_csv, submit_job
from harness.fleet import RedisServer
from harness.servers import ROOT, ServeProcess

FINAL = ("completed", "failed", "cancelled")


def _seconds(status: dict, start: str, end: str) -> float:
    def parse(stamp: str) -> datetime:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    return (parse(status[end]) - parse(status[start])).total_seconds()


def wait(url: str, job_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while (status := httpx.get(f"{url}/jobs/{job_id}", timeout=10).json())["status"] not in FINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(status)
        time.sleep(0.1)
    if status["status"] != "completed":
        raise RuntimeError(status)
    return status


def server(redis_url: str, cpu: str, workers: int = 1, **env: str) -> ServeProcess:
    env = {"BANKCHURN_REDIS_URL": redis_url, "BANKCHURN_JOB_WORKERS": str(workers), **env}
    proc = ServeProcess(env=env, prefix=("taskset", "-c", cpu)).start()
    proc.wait_ready(180)
    return proc


def kill_tree(proc: ServeProcess) -> None:
    root = psutil.Process(proc.proc.pid)
    tree = [root, *root.children(recursive=True)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=10)
    proc.proc.wait(10)


def throughput(redis: RedisServer, data: bytes, rows: int, runs: int) -> dict:
    s = server(redis.url, "0")
    try:
        results = []
        for _ in range(runs):
            job_id = submit_job(s.url, data, timeout=120).json()["job_id"]
            status = wait(s.url, job_id)
            scoring = _seconds(status, "started_at", "completed_at")
            total = _seconds(status, "created_at", "completed_at")
            results.append({"scoring_s": scoring, "total_s": total, "rows_per_s": rows / scoring})
            print(
                f"  {rows} rows: scored in {scoring:.2f} s ({rows / scoring:,.0f} rows/s), {total:.2f} s from submission"
            )
        return {"runs": results, "median_rows_per_s": statistics.median(r["rows_per_s"] for r in results)}
    finally:
        s.stop()


def predict_under_job(redis: RedisServer, data: bytes, rows: int, duration: float) -> dict:
    script = write_script("predict")
    s = server(redis.url, "0")
    try:
        run_wrk(s.url, script, 10, 3, "1")  # warm-up
        idle = run_wrk(s.url, script, 50, duration, "1")
        print(
            f"  /predict, no job:      {idle['rps']:7.0f} req/s  p50 {idle['p50_ms']:.1f} ms  p99 {idle['p99_ms']:.1f} ms"
        )
        jobs = [submit_job(s.url, data, timeout=120).json()["job_id"] for _ in range(3)]
        while httpx.get(f"{s.url}/jobs/{jobs[0]}").json()["rows_done"] == 0:
            time.sleep(0.05)
        before = sum(httpx.get(f"{s.url}/jobs/{j}").json()["rows_done"] for j in jobs)
        started = time.monotonic()
        busy = run_wrk(s.url, script, 50, duration, "1")
        elapsed = time.monotonic() - started
        states = [httpx.get(f"{s.url}/jobs/{j}").json() for j in jobs]
        done = sum(st["rows_done"] for st in states) - before
        still_running = any(st["status"] in ("queued", "running") for st in states)
        print(
            f"  /predict, job running: {busy['rps']:7.0f} req/s  p50 {busy['p50_ms']:.1f} ms  p99 {busy['p99_ms']:.1f} ms"
            f"  (jobs scored {done / elapsed:,.0f} rows/s meanwhile; a job still running at the end: {still_running})"
        )
        for job_id in jobs:
            httpx.delete(f"{s.url}/jobs/{job_id}")
        return {
            "idle": idle,
            "with_job": busy,
            "job_rows_per_s_meanwhile": done / elapsed,
            "job_ran_throughout": still_running,
        }
    finally:
        s.stop()


def resumption(redis: RedisServer, data: bytes, rows: int) -> dict:
    servers = [server(redis.url, "0"), server(redis.url, "1")]
    try:
        job_id = submit_job(servers[0].url, data, timeout=120).json()["job_id"]
        while (status := httpx.get(f"{servers[0].url}/jobs/{job_id}").json())["rows_done"] < rows // 5:
            time.sleep(0.05)
        worker_pid = int(status["worker"].rsplit(":", 1)[1])
        victim = next(
            s for s in servers if worker_pid in {c.pid for c in psutil.Process(s.proc.pid).children(recursive=True)}
        )
        survivor = next(s for s in servers if s is not victim)
        killed = time.monotonic()
        kill_tree(victim)
        while (after := httpx.get(f"{survivor.url}/jobs/{job_id}").json())["attempts"] < 2:
            time.sleep(0.1)
        resumed = time.monotonic() - killed
        final = wait(survivor.url, job_id)
        completed = time.monotonic() - killed
        print(
            f"  killed at {status['rows_done']} rows; resumed {resumed:.1f} s later at {after['rows_done']} rows "
            f"(attempt {after['attempts']}); completed {completed:.1f} s after the kill"
        )
        return {
            "rows_at_kill": status["rows_done"],
            "rows_at_resume": after["rows_done"],
            "resume_s": resumed,
            "complete_after_kill_s": completed,
            "attempts": final["attempts"],
        }
    finally:
        for s in servers:
            s.stop()


def markdown(results: dict, meta: dict) -> str:
    t, p, r = results["throughput"], results["predict"], results["resume"]
    idle, busy = p["idle"], p["with_job"]
    return "\n".join(
        [
            f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}. Command: `{meta['command']}`",
            "",
            f"- Job throughput, {meta['rows']:,}-row file, one worker on one core: "
            f"**{t['median_rows_per_s']:,.0f} rows/s** (median of {len(t['runs'])}; scoring "
            + ", ".join(f"{x['scoring_s']:.1f} s" for x in t["runs"])
            + ")",
            f"- Resumption after kill -9 of the worker's server: running again **{r['resume_s']:.1f} s** after the kill "
            f"(at {r['rows_at_resume']:,} of {meta['rows']:,} rows, scored before the kill: {r['rows_at_kill']:,}); "
            f"completed {r['complete_after_kill_s']:.1f} s after the kill",
            "",
            "| /predict, 50 connections, server on 1 core | req/s | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|",
            f"| no job | {idle['rps']:.0f} | {idle['p50_ms']:.1f} | {idle['p99_ms']:.1f} | {idle['errors']} |",
            f"| a job running in the same process | {busy['rps']:.0f} | {busy['p50_ms']:.1f} | {busy['p99_ms']:.1f} | "
            f"{busy['errors']} |",
            "",
            f"p99 with / without a job: {busy['p99_ms'] / idle['p99_ms']:.2f}x; req/s {busy['rps'] / idle['rps']:.2f}x; "
            f"the jobs meanwhile scored {p['job_rows_per_s_meanwhile']:,.0f} rows/s "
            f"(a job ran for the whole window: {p['job_ran_throughout']}).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    a = p.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        p.error("needs 2 cores (server and load generator pinned apart)")
    meta = run_meta("jobs", argv, rows=a.rows)
    print(meta["machine"], "| commit", meta["commit"])
    data = customers_csv(a.rows)
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-"))).start()
    try:
        print("throughput:")
        results = {"throughput": throughput(redis, data, a.rows, a.runs)}
        print("/predict with and without a job:")
        results["predict"] = predict_under_job(redis, data, a.rows, a.duration)
        print("resumption after kill -9:")
        results["resume"] = resumption(redis, data, a.rows)
    finally:
        redis.stop()
    table = markdown(results, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "jobs.md").write_text(table + "\n")
    (a.out / "jobs.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print()
    print(table)
    print(f"\nwrote {a.out / 'jobs.md'}, jobs.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
