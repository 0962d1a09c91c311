"""Monitoring benchmark: what the prediction log costs a request and a job, and what a drift
report costs.

    python -m benchmarks.monitoring                      # or: make bench
    python -m benchmarks.monitoring --rounds 1 --duration 5 --job-rows 50000 --report-rows 200000

1. /predict at 50 connections (wrk on CPU 1) against `bentoml serve` pinned to CPU 0, with
   the prediction log off, at sample 1.0 to the file sink (`make serve`'s default), and at
   sample 1.0 to the Redis stream (the Kubernetes layout; redis-server on CPU 1). The servers
   run side by side and are loaded in turn, --rounds times, alternately; medians kept.
2. A --job-rows scoring job (one job worker, server on CPU 0, Redis on CPU 1) with the log off
   / file / Redis, alternately, --rounds times: rows/s from the job's start to its end, and
   the rows the log dropped.
3. The drift scenario with the served model: its held-out test split sent as a scoring job,
   then the same customers with Age + 10 and 70% in Germany through /predict_batch; the
   drift command on each window (the false-alarm and drift tables) and the performance
   command on the test split's outcomes (beside the training report's test metrics).
4. `python -m monitoring.drift` over --report-rows logged rows (the dataset's customers with
   the served model's probabilities, written by the real sink code): wall time and peak RSS of
   the command, for the file sink and the Redis stream.

Target: the log at sample 1.0 costs at most 5% of /predict's req/s and of a job's rows/s.
Prints the figures and writes reports/bench/monitoring.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from benchmarks.http import run_meta, run_wrk, tree_cpu_s, write_script
from benchmarks.jobs import wait
from harness.data import DATA, customers_csv, drifted, submit_job
from harness.fleet import RedisServer
from harness.servers import ROOT, ServeProcess, metric
from models.schema import CATEGORICAL_FEATURES, FEATURE_NAMES, NUMERIC_FEATURES, json_customer, row_values
from models.store import get_stored, served_tag
from serving.predictionlog.sinks import FileSink, RedisStreamSink, iso_time, redis_client
from training.data import load_data

TARGET_COST = 0.05
SINKS = ("off", "file", "redis")


def sink_env(sink: str, redis_url: str, log_dir: Path) -> dict[str, str]:
    if sink == "off":
        return {"BANKCHURN_PREDICTION_LOG_SINK": "off"}
    if sink == "file":
        return {"BANKCHURN_PREDICTION_LOG_SINK": "file", "BANKCHURN_PREDICTION_LOG_DIR": str(log_dir / "file")}
    return {"BANKCHURN_PREDICTION_LOG_SINK": "redis", "BANKCHURN_PREDICTION_LOG_REDIS_URL": redis_url}


def start(env: dict[str, str]) -> ServeProcess:
    proc = ServeProcess(env=env, prefix=("taskset", "-c", "0")).start()
    proc.wait_ready(180)
    return proc


def dropped(server: ServeProcess) -> float:
    return metric(
        httpx.get(f"{server.url}/metrics", timeout=10).text, "bank_churn_prediction_log_dropped_rows_total", 0
    )


def predict_cells(redis: RedisServer, log_dir: Path, rounds: int, duration: float) -> dict:
    script = write_script("predict")
    servers = {sink: start({**sink_env(sink, redis.url, log_dir), "BANKCHURN_JOB_WORKERS": "0"}) for sink in SINKS}
    try:
        for server in servers.values():
            run_wrk(server.url, script, 10, 3, "1")  # warm-up
        cells: dict[str, list[dict]] = {sink: [] for sink in SINKS}
        for r in range(rounds):
            order = SINKS if r % 2 == 0 else SINKS[::-1]
            for sink in order:
                # the server's CPU per request as well: steadier than req/s on a shared machine
                before = tree_cpu_s(servers[sink].proc.pid)
                cell = run_wrk(servers[sink].url, script, 50, duration, "1")
                cell["cpu_us_per_request"] = (
                    (tree_cpu_s(servers[sink].proc.pid) - before) * 1e6 / max(cell["requests"], 1)
                )
                cells[sink].append(cell)
                print(f"  round {r + 1} {sink:>5}: {cell['rps']:7.0f} req/s  {cell['cpu_us_per_request']:5.0f} CPU us/request  p50 {cell['p50_ms']:.1f} ms  p99 {cell['p99_ms']:.1f} ms  errors {cell['errors']}")  # fmt: skip
        return {
            sink: {
                "rps_median": statistics.median(c["rps"] for c in cells[sink]),
                "cpu_us_median": statistics.median(c["cpu_us_per_request"] for c in cells[sink]),
                "p99_ms_median": statistics.median(c["p99_ms"] for c in cells[sink]),
                "rounds": cells[sink],
                "dropped_rows": dropped(servers[sink]) if sink != "off" else 0,
            }
            for sink in SINKS
        }
    finally:
        for server in servers.values():
            server.stop()


def job_cells(redis: RedisServer, log_dir: Path, rows: int, rounds: int) -> dict:
    data = customers_csv(rows)
    results: dict[str, list[float]] = {sink: [] for sink in SINKS}
    drops: dict[str, float] = {}
    for r in range(rounds):
        order = SINKS if r % 2 == 0 else SINKS[::-1]
        for sink in order:
            # one server at a time: a job worker polls its queue, so an idle one costs a little
            env = {**sink_env(sink, redis.url, log_dir), "BANKCHURN_REDIS_URL": redis.url, "BANKCHURN_JOB_WORKERS": "1"}
            env["BANKCHURN_JOB_QUEUE"] = f"bench_{sink}"
            server = start(env)
            try:
                job_id = submit_job(server.url, data, timeout=120).json()["job_id"]
                status = wait(server.url, job_id)
                started = _epoch(status["started_at"])
                seconds = _epoch(status["completed_at"]) - started
                results[sink].append(rows / seconds)
                drops[sink] = drops.get(sink, 0) + (dropped(server) if sink != "off" else 0)
                print(f"  round {r + 1} {sink:>5}: {rows / seconds:9,.0f} rows/s ({seconds:.2f} s)")
            finally:
                server.stop()
    return {
        sink: {"rows_per_s_median": statistics.median(v), "rows_per_s": v, "dropped_rows": drops.get(sink, 0)}
        for sink, v in results.items()
    }


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def logged_rows(n: int) -> tuple[list[tuple], np.ndarray, str]:
    """n real customers (the dataset repeated) with the served model's probabilities."""
    from models.predictor import load_predictor

    model = get_stored(served_tag())
    predictor = load_predictor(model)
    base = [row_values(json_customer(r)) for r in load_data()[list(FEATURE_NAMES)].to_dict(orient="records")]
    proba = predictor.predict_rows(base)
    reps = -(-n // len(base))
    return (base * reps)[:n], np.tile(proba, reps)[:n], str(model.tag)


def write_log(sink, rows: list[tuple], proba: np.ndarray, tag: str, threshold: float) -> None:
    now = time.time()
    for start_at in range(0, len(rows), 10_000):
        chunk = rows[start_at : start_at + 10_000]
        p = proba[start_at : start_at + 10_000].tolist()
        stamp = iso_time(now - 3600 + start_at * 3600 / len(rows))
        sink.write(
            [
                sink.record_type(
                    stamp, tag, "/jobs", None, "bench", start_at + i + 1, None, *row, p[i], p[i] >= threshold
                )
                for i, row in enumerate(chunk)
            ]
        )


def run_report(env: dict[str, str], out: Path) -> dict:
    start_at = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitoring.drift", "--since", "2h", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    watcher = psutil.Process(proc.pid)
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, watcher.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch)
    thread.start()
    _, stderr = proc.communicate()
    stop.set()
    thread.join()
    seconds = time.monotonic() - start_at
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"monitoring.drift exited {proc.returncode}:\n{stderr[-2000:]}")
    report = json.loads((out / "drift.json").read_text())
    return {
        "seconds": seconds,
        "peak_rss_mb": peak / 2**20,
        "rows_current": report["rows_current"],
        "exit": proc.returncode,
    }


def report_cells(redis: RedisServer, rows: int, work: Path) -> dict:
    logged, proba, tag = logged_rows(rows)
    threshold = float(get_stored(tag).info.metadata["threshold"])
    out = {}
    file_dir = work / "report-file"
    sink = FileSink(file_dir, retention_s=86400, max_bytes=1 << 40)
    write_log(sink, logged, proba, tag, threshold)
    sink.close()
    env = {"BANKCHURN_PREDICTION_LOG_SINK": "file", "BANKCHURN_PREDICTION_LOG_DIR": str(file_dir)}
    out["file"] = run_report(env, work / "drift-file")
    print(f"  file:  {out['file']['seconds']:.1f} s, peak RSS {out['file']['peak_rss_mb']:.0f} MB for {out['file']['rows_current']:,} rows")  # fmt: skip
    client = redis_client(redis.url)
    stream = RedisStreamSink(client, "bench:predictions", retention_s=86400, max_rows=rows * 2)
    write_log(stream, logged, proba, tag, threshold)
    memory = client.memory_usage("bench:predictions", samples=0)
    client.close()
    env = {
        "BANKCHURN_PREDICTION_LOG_SINK": "redis",
        "BANKCHURN_PREDICTION_LOG_REDIS_URL": redis.url,
        "BANKCHURN_PREDICTION_LOG_STREAM": "bench:predictions",
    }
    out["redis"] = run_report(env, work / "drift-redis")
    out["redis"]["stream_bytes_per_row"] = memory / rows
    print(f"  redis: {out['redis']['seconds']:.1f} s, peak RSS {out['redis']['peak_rss_mb']:.0f} MB for {out['redis']['rows_current']:,} rows; the stream holds {memory / rows:.0f} B/row")  # fmt: skip
    out["file"]["bytes_per_row"] = sum(p.stat().st_size for p in file_dir.iterdir()) / rows
    return out


def writer_cells(redis: RedisServer, work: Path, rows: int = 200_000) -> dict:
    """CPU time the log's writer thread spends per row (expanding batches into records,
    encoding, writing), in this process: what the log takes from a server's core, free of the
    HTTP cells' noise. Batches of 1, 32 and 5,000 rows (single /predict calls under light and
    heavy load, a job's chunk)."""
    from serving.predictionlog.writer import PredictionLog, Scored

    base = [row_values(json_customer(r)) for r in load_data()[list(FEATURE_NAMES)].to_dict(orient="records")]
    chunk = (base * (5000 // len(base) + 1))[:5000]
    numeric_at = [FEATURE_NAMES.index(name) for name in NUMERIC_FEATURES]
    job_columns = (
        np.array([[row[i] for i in numeric_at] for row in chunk], dtype=np.float64),
        {
            name: np.array([row[FEATURE_NAMES.index(name)] for row in chunk], dtype=object)
            for name in CATEGORICAL_FEATURES
        },
    )
    out: dict = {}
    for sink_name in ("file", "redis"):
        for size in (1, 32, 5000):
            if sink_name == "file":
                sink = FileSink(work / f"writer-{size}", retention_s=86400, max_bytes=1 << 40)
            else:
                sink = RedisStreamSink(redis_client(redis.url), f"bench:writer:{size}", 86400, rows * 2)
            log = PredictionLog(sink, "bank_churn:bench", max_rows=rows * 2)
            n = rows // size if size > 1 else rows // 20
            batches = [
                Scored(
                    time.time(),
                    np.full(size, 0.3),
                    np.ones(size, bool),
                    ("/predict",) * size if size < 5000 else "/jobs",  # coalesced calls: a route and id each
                    tuple(f"{i:032x}" for i in range(size)) if size < 5000 else None,
                    rows=(base * (size // len(base) + 1))[:size] if size < 5000 else None,
                    columns=job_columns if size >= 5000 else None,  # a job's chunk, as a job hands it over
                    job_id="job" if size >= 5000 else None,
                    row_numbers=np.arange(1, size + 1) if size >= 5000 else None,
                    customer_ids=[str(15_600_000 + i) for i in range(size)] if size >= 5000 else None,
                )
                for _ in range(n)
            ]
            for b in batches:
                log.add(b)
            started = time.thread_time()
            log._drain()  # the writer thread's work, on this thread, timed
            spent = time.thread_time() - started
            sink.close()
            out[f"{sink_name} x{size}"] = spent / (n * size) * 1e6
            print(f"  {sink_name:>5}, batches of {size:>4}: {out[f'{sink_name} x{size}']:.2f} us CPU per logged row")
    return out


def run_cli(module: str, env: dict[str, str], *args: str) -> tuple[int, dict]:
    out = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    flag = "--out"
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, flag, str(out)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    name = "drift.json" if module.endswith("drift") else "performance.json"
    return proc.returncode, json.loads((out / name).read_text())


def scenario_cells(work: Path) -> dict:
    """The test split as traffic, then the drifted test split; the monitoring commands' answers."""
    import pandas as pd

    from training.data import stratify_split

    model = get_stored(served_tag())
    split = model.info.metadata
    test = stratify_split(load_data(), 0.2, 0.16, int(split.get("seed", 42))).test
    assert len(test) == split["data"]["test_rows"], "the served model's test split"
    ids = pd.read_csv(DATA, usecols=["CustomerId"])["CustomerId"].to_numpy()[test.index]
    env = {"BANKCHURN_PREDICTION_LOG_SINK": "file", "BANKCHURN_PREDICTION_LOG_DIR": str(work / "scenario")}
    server = start(env)
    try:
        start_at = time.time()
        upload = test[list(FEATURE_NAMES)].assign(CustomerId=ids).to_csv(index=False).encode()
        wait(server.url, submit_job(server.url, upload, timeout=120).json()["job_id"])
        _wait_written(server, len(test))
        middle = time.time()
        shifted = [json_customer(r) for r in drifted(test).to_dict(orient="records")]
        for i in range(0, len(shifted), 1000):
            httpx.post(f"{server.url}/predict_batch", json={"customers": shifted[i : i + 1000]}, timeout=120)
        _wait_written(server, 2 * len(test))
        end = time.time() + 0.01
    finally:
        server.stop()
    window = lambda a, b: ("--since", iso_time(a), "--until", iso_time(b))  # noqa: E731
    quiet_exit, quiet = run_cli("monitoring.drift", env, *window(start_at, middle))
    drift_exit, drift = run_cli("monitoring.drift", env, *window(middle, end))
    outcomes = work / "outcomes.csv"
    pd.DataFrame({"CustomerId": ids, "Exited": test["Exited"].to_numpy(), "date": iso_time(end + 86400)}).to_csv(
        outcomes, index=False
    )
    perf_exit, performance = run_cli(
        "monitoring.performance", env, "--outcomes", str(outcomes), *window(start_at, middle)
    )
    print(f"  test split: exit {quiet_exit}, drifted {quiet['drifted_features']}; drifted traffic: exit {drift_exit}, drifted {drift['drifted_features']}, prediction drift {drift['prediction_drift']}")  # fmt: skip
    return {
        "model": str(model.tag),
        "no_drift": {"exit": quiet_exit, **quiet},
        "drift": {"exit": drift_exit, **drift},
        "performance": {"exit": perf_exit, **performance},
        "training_test_metrics": split["metrics"],
    }


def _wait_written(server: ServeProcess, rows: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while metric(httpx.get(f"{server.url}/metrics").text, "bank_churn_prediction_log_written_rows_total", 0) < rows:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{rows} rows not logged after {timeout} s")
        time.sleep(0.2)


def scenario_markdown(s: dict) -> list[str]:
    quiet, drift = s["no_drift"], s["drift"]
    lines = [
        f"Drift scenario, model `{s['model']}`: its held-out test split ({quiet['rows_current']:,} rows, as a "
        f"scoring job) and the same customers with Age + 10 years and 70% in Germany "
        f"({drift['rows_current']:,} rows, /predict_batch), each window judged by `python -m monitoring.drift` "
        f"against the {quiet['rows_reference']:,}-row reference (drift at 0.1 and above):",
        "",
        "| column | method | test split: score | drift? | drifted traffic: score | drift? |",
        "|---|---|---:|---|---:|---|",
    ]
    for name, column in quiet["features"].items():
        other = drift["features"][name]
        lines.append(
            f"| {name} | {column['method']} | {column['score']:.3f} | {'**yes**' if column['drifted'] else 'no'} | "
            f"{other['score']:.3f} | {'**yes**' if other['drifted'] else 'no'} |"
        )
    qp, dp = quiet["prediction"], drift["prediction"]
    lines += [
        f"| churn_probability (prediction) | {qp['method']} | {qp['score']:.3f} | {'**yes**' if qp['drifted'] else 'no'} | "
        f"{dp['score']:.3f} | {'**yes**' if dp['drifted'] else 'no'} |",
        f"| exit status | | {quiet['exit']} | | {drift['exit']} | |",
        "",
    ]
    perf, test = s["performance"], s["training_test_metrics"]
    lines += [
        f"Realized performance on the test split's outcomes (`python -m monitoring.performance`, "
        f"{perf['rows_matched']:,} matched, exit {perf['exit']}):",
        "",
        "| metric | realized | training report, test split | training estimate (CV) |",
        "|---|---:|---:|---:|",
    ]
    for name in ("roc_auc", "pr_auc", "brier"):
        m = perf["metrics"][name]
        lines.append(
            f"| {name} | {m['realized']:.6f} | {test[name]:.6f} | {m['estimate']['mean']:.4f} ± {m['estimate']['std']:.4f} |"
        )
    return [*lines, ""]


def markdown(results: dict, meta: dict) -> str:
    p, j, r = results["predict"], results["job"], results["report"]
    lines = [
        f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}. Command: `{meta['command']}`",
        "",
        f"| prediction log | /predict req/s (50 conns, median of {meta['rounds']}) | p99 ms | vs off | "
        f"server CPU µs per /predict | vs off | {meta['job_rows']:,}-row job rows/s | vs off | rows dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sink in SINKS:
        rps, jr = p[sink]["rps_median"], j[sink]["rows_per_s_median"]
        lines.append(
            f"| {sink if sink != 'off' else 'off (BANKCHURN_PREDICTION_LOG_SINK=off)'} | {rps:,.0f} | "
            f"{p[sink]['p99_ms_median']:.1f} | {rps / p['off']['rps_median']:.3f}x | {p[sink]['cpu_us_median']:.0f} | "
            f"{p['off']['cpu_us_median'] / p[sink]['cpu_us_median']:.3f}x | {jr:,.0f} | "
            f"{jr / j['off']['rows_per_s_median']:.3f}x | {p[sink]['dropped_rows'] + j[sink]['dropped_rows']:,.0f} |"
        )
    lines += [
        "",
        f"| drift report over {meta['report_rows']:,} logged rows (`python -m monitoring.drift`) | wall s | peak RSS MB |",
        "|---|---:|---:|",
        f"| file sink ({r['file']['bytes_per_row']:.0f} B/row on disk) | {r['file']['seconds']:.1f} | {r['file']['peak_rss_mb']:.0f} |",
        f"| Redis stream ({r['redis']['stream_bytes_per_row']:.0f} B/row in Redis) | {r['redis']['seconds']:.1f} | {r['redis']['peak_rss_mb']:.0f} |",
        "",
        "The writer thread's CPU per logged row, in process (the cost the HTTP cells above try to see through "
        "the noise): "
        + ", ".join(f"{k}: {v:.2f} µs" for k, v in results["writer"].items())
        + f". At /predict's {p['off']['rps_median']:,.0f} req/s that is "
        + f"{results['writer']['file x32'] * p['off']['rps_median'] / 1e4:.2f}% of a core (file, batches of 32); "
        + f"at the job's {j['off']['rows_per_s_median']:,.0f} rows/s, "
        + f"{results['writer']['file x5000'] * j['off']['rows_per_s_median'] / 1e4:.2f}% (file) and "
        + f"{results['writer']['redis x5000'] * j['off']['rows_per_s_median'] / 1e4:.2f}% (Redis, client side).",
        "",
        *scenario_markdown(results["scenario"]),
        "Target: the log at sample 1.0 costs at most 5% (ratio >= 0.95). "
        + "; ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in results["verdicts"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--job-rows", type=int, default=200_000)
    p.add_argument("--report-rows", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    p.add_argument(
        "--only",
        choices=("predict", "job", "writer", "scenario", "report"),
        help="one part only (no report files written)",
    )
    a = p.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        p.error("needs 2 cores (server and load generator pinned apart)")
    meta = run_meta("monitoring", argv, rounds=a.rounds, job_rows=a.job_rows, report_rows=a.report_rows)
    print(meta["machine"], "| commit", meta["commit"])
    work = Path(tempfile.mkdtemp(prefix="bench-monitoring-"))
    redis = RedisServer(work / "redis").start()
    subprocess.run(["taskset", "-cp", "1", str(redis.proc.pid)], check=True, capture_output=True)
    results: dict = {}
    try:
        if a.only in (None, "predict"):
            print("/predict, 50 connections:")
            results["predict"] = predict_cells(redis, work, a.rounds, a.duration)
        if a.only in (None, "job"):
            print(f"{a.job_rows:,}-row job:")
            results["job"] = job_cells(redis, work, a.job_rows, a.rounds)
        if a.only in (None, "writer"):
            print("the writer's CPU per logged row:")
            results["writer"] = writer_cells(redis, work)
        if a.only in (None, "scenario"):
            print("drift scenario:")
            results["scenario"] = scenario_cells(work)
        if a.only in (None, "report"):
            print(f"drift report over {a.report_rows:,} logged rows:")
            results["report"] = report_cells(redis, a.report_rows, work)
    finally:
        redis.stop()
    if a.only:
        print(json.dumps(results, indent=2, default=str)[:4000])
        return 0
    results["verdicts"] = {
        f"{what} {sink}": results[key][sink][metric_] / results[key]["off"][metric_] >= 1 - TARGET_COST
        for what, key, metric_ in (("/predict", "predict", "rps_median"), ("job", "job", "rows_per_s_median"))
        for sink in ("file", "redis")
    }
    for sink in ("file", "redis"):  # CPU per request: off's over the sink's (1.0 = no cost)
        predict = results["predict"]
        results["verdicts"][f"/predict CPU per request {sink}"] = (
            predict["off"]["cpu_us_median"] / predict[sink]["cpu_us_median"] >= 1 - TARGET_COST
        )
    table = markdown(results, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "monitoring.md").write_text(table + "\n")
    (a.out / "monitoring.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print()
    print(table)
    print(f"\nwrote {a.out / 'monitoring.md'}, monitoring.json")
    return 0 if all(results["verdicts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
