"""Spark scoring benchmark: rows/s of the Spark job on local[1] and local[2], beside the model's
own single-core rate on the same rows and the jobs API's rate on the same machine.

    python -m benchmarks.spark                           # 1,000,000 and 5,000,000 rows (make bench)
    python -m benchmarks.spark --rows 1000000 --no-jobs  # quicker

Real parts only: the dataset's customers resampled into Parquet part files (harness.data), the
served model from the store (bank_churn:latest, or BANKCHURN_MODEL_TAG), a real local Spark per
run in its own process (a JVM, its Python workers), and for the jobs API a real `bentoml serve`
with Redis (benchmarks.jobs, 200,000 rows on one core).

Each Spark run is the job's own code path (batch.spark: session, ship the model, read Parquet,
mapInArrow over batch.arrow.score_batch, write Parquet) with timers around its parts: the
JVM and session start, the model's export and shipping, the job itself, and inside the Python
workers the model load, each batch's scoring and, within it, the model call. The fixed start-up
cost is a 1,000-row run's wall time. Rates: over the wall time, over the job (once the session
is up and the model shipped), and steady (the job less a 1,000-row job: reading, scoring and
writing once the workers are up); the targets are judged on the steady rate, the start-up costs
being reported on their own. Runs of one size alternate
local[1] and local[2]. The model's own rate: one thread of this process, pinned to one
core, over the same file's first 300,000 rows in the job's 10,000-row Arrow batches (3 alternate
rounds with the executors' whole per-batch work, medians).

Targets (issue 20): local[2] >= 1.6 x local[1]; local[2] >= 0.7 x (2 x the model's single-core
rate). Prints the figures and writes reports/bench/spark.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH_ROWS = 10_000  # Spark's default spark.sql.execution.arrow.maxRecordsPerBatch, set explicitly
FIXED_ROWS = 1_000
PART_FILES = 8


# ---------------------------------------------------------------- one Spark run (a child process)


class _TimedModel:
    """The predictor with a stopwatch on its model call (what batch.arrow.Scoring calls)."""

    def __init__(self, predictor, seconds):
        self._predictor, self._seconds = predictor, seconds
        self.threshold = predictor.threshold

    def predict_columns(self, numeric, categorical):
        started = time.perf_counter()
        try:
            return self._predictor.predict_columns(numeric, categorical)
        finally:
            self._seconds.add(time.perf_counter() - started)


def _timed_partition(shipped, timers, batches):
    """batch.spark._score_partition with stopwatches: load once per worker, score each batch."""
    from pyspark import SparkFiles

    from batch.arrow import Scoring, score_batch
    from batch.shipping import load_shipped, loaded_models

    load_s, batch_s, model_s, rows, workers = timers
    scoring = None
    for batch in batches:
        if scoring is None:
            fresh = not loaded_models()
            started = time.perf_counter()
            predictor = load_shipped(shipped, SparkFiles.get(shipped.alias))
            load_s.add(time.perf_counter() - started)
            workers.add(1 if fresh else 0)
            scoring = Scoring(_TimedModel(predictor, model_s), shipped.tag, ("CustomerId",))
        started = time.perf_counter()
        out = score_batch(batch, scoring)
        batch_s.add(time.perf_counter() - started)
        rows.add(out.num_rows)
        yield out


def child(master: str, data: str, out: str, model: str) -> dict:
    """One run, as `python -m batch.spark` does it, timed part by part."""
    started = time.perf_counter()
    from pyspark.sql.types import BooleanType, DoubleType, LongType, StringType, StructField, StructType

    from batch.spark import read_customers, session, ship_model

    conf = {"spark.ui.enabled": "false", "spark.sql.execution.arrow.maxRecordsPerBatch": str(BATCH_ROWS)}
    spark = session(master, conf, app_name="bench")
    session_s = time.perf_counter() - started
    t = time.perf_counter()
    shipped = ship_model(spark, model)
    ship_s = time.perf_counter() - t
    context = spark.sparkContext
    timers = (context.accumulator(0.0), context.accumulator(0.0), context.accumulator(0.0))
    timers += (context.accumulator(0), context.accumulator(0))
    schema = StructType(
        [
            StructField("CustomerId", LongType()),
            StructField("churn_probability", DoubleType()),
            StructField("will_churn", BooleanType()),
            StructField("model_version", StringType()),
            StructField("error", StringType()),
        ]
    )
    from models.schema import FEATURE_NAMES

    t = time.perf_counter()
    df = read_customers(spark, data, "parquet").select("CustomerId", *FEATURE_NAMES)
    df.mapInArrow(functools.partial(_timed_partition, shipped, timers), schema).write.parquet(out)
    job_s = time.perf_counter() - t
    spark.stop()
    load_s, batch_s, model_s, rows, workers = (a.value for a in timers)
    return {
        "master": master,
        "rows": rows,
        "session_s": session_s,
        "ship_s": ship_s,
        "job_s": job_s,
        "worker_load_s": load_s,
        "batch_s": batch_s,
        "model_s": model_s,
        "workers": workers,
        "backend": shipped.backend,
        "tag": shipped.tag,
    }


def spark_run(master: str, data: Path, model: str) -> dict:
    """A child process for one run; wall time from its start to its exit."""
    out = Path(tempfile.mkdtemp(prefix="bench-spark-out-")) / "scores"
    command = [sys.executable, "-m", "benchmarks.spark", "--child", master, str(data), str(out), model]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    subprocess.run(["rm", "-rf", str(out.parent)], check=False)
    return result


# ---------------------------------------------------------------- the parent


def write_parquet(rows: int, directory: Path, seed: int) -> Path:
    import pyarrow.parquet as pq

    from harness.data import customers_table

    table = customers_table(rows, seed=seed)
    path = directory / f"customers-{rows}.parquet"
    path.mkdir(parents=True)
    per_file = -(-rows // PART_FILES)
    for k in range(PART_FILES):
        pq.write_table(table.slice(k * per_file, per_file), path / f"part-{k}.parquet")
    return path


def model_rates(data: Path, model: str, rows: int = 500_000, rounds: int = 3) -> dict:
    """The model alone and the executors' whole per-batch work, one thread on one core, measured
    alternately `rounds` times (medians)."""
    import bentoml
    import pyarrow.dataset as ds

    from batch.arrow import Scoring, score_batch
    from models.columns import validate_columns
    from models.predictor import load_predictor
    from models.schema import FEATURE_NAMES

    os.sched_setaffinity(0, {0})
    try:
        predictor = load_predictor(bentoml.models.get(model))
        scanner = ds.dataset(str(data)).scanner(columns=["CustomerId", *FEATURE_NAMES], batch_size=BATCH_ROWS)
        batches = []
        for batch in scanner.to_batches():
            if batch.num_rows:
                batches.append(batch)
            if sum(b.num_rows for b in batches) >= rows:
                break
        n = sum(b.num_rows for b in batches)
        checked = [
            validate_columns({c: b.column(c).to_numpy(zero_copy_only=False) for c in FEATURE_NAMES}) for b in batches
        ]
        predictor.predict_columns(checked[0].numeric, checked[0].categorical)  # warm
        scoring = Scoring(predictor, model, ("CustomerId",))
        model_s, batch_s = [], []
        for _ in range(rounds):  # alternately, so both see the same machine
            started = time.perf_counter()
            for c in checked:
                predictor.predict_columns(c.numeric, c.categorical)
            model_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            for b in batches:
                score_batch(b, scoring)
            batch_s.append(time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {
        "rows": n,
        "rounds": rounds,
        "model_rows_per_s": n / statistics.median(model_s),
        "score_batch_rows_per_s": n / statistics.median(batch_s),
    }


def jobs_rate(rows: int = 200_000) -> dict:
    from benchmarks.jobs import throughput
    from harness.data import customers_csv
    from harness.fleet import RedisServer

    redis = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-"))).start()
    try:
        return throughput(redis, customers_csv(rows), rows, runs=1)
    finally:
        redis.stop()


def _row(r: dict, fixed: dict) -> dict:
    """A run's rates: over its wall time; over its job (the session up and the model shipped:
    reading, Python worker start and model load, scoring, writing); and steady, the job less a
    1,000-row job's time (scheduling, worker start, model load), when the run is long enough."""
    slots = int(r["master"].removeprefix("local[").removesuffix("]"))
    slot_s = r["job_s"] * slots
    steady_s = r["job_s"] - fixed["job_s"]
    return {
        **r,
        "rows_per_s": r["rows"] / r["wall_s"],
        "job_rows_per_s": r["rows"] / r["job_s"],
        "steady_rows_per_s": r["rows"] / steady_s if steady_s > 0.2 * r["job_s"] else None,
        "share_model": r["model_s"] / slot_s,
        "share_python_rest": (r["batch_s"] - r["model_s"]) / slot_s,
        "share_load": r["worker_load_s"] / slot_s,
        "share_spark": max(0.0, 1 - (r["batch_s"] + r["worker_load_s"]) / slot_s),
    }


def _rate(value: float | None) -> str:
    return "n/a (run too short)" if value is None else f"{value:,.0f}"


def markdown(results: dict, meta: dict) -> str:
    m, fixed = results["model"], results["fixed"]
    lines = [
        f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}. Command: `{meta['command']}`",
        "",
        f"Model `{meta['tag']}` ({results['runs'][0]['backend']}). In process, one thread pinned to one core, "
        f"{m['rows']:,} of the same rows in {BATCH_ROWS:,}-row Arrow batches (median of {m['rounds']} alternate rounds): the model alone "
        f"**{m['model_rows_per_s']:,.0f} rows/s**; the executors' whole per-batch work (Arrow to NumPy, "
        f"the schema's checks, the model, Arrow out) {m['score_batch_rows_per_s']:,.0f} rows/s.",
    ]
    if results.get("jobs"):
        lines.append(
            f"Jobs API (`POST /jobs`, 200,000-row CSV, one job worker on one core, benchmarks.jobs): "
            f"**{results['jobs']['median_rows_per_s']:,.0f} rows/s**."
        )
    lines += [
        "",
        "Fixed start-up cost (a 1,000-row run, wall): "
        + ", ".join(
            f"{k} {v['wall_s']:.1f} s (JVM + session {v['session_s']:.1f} s, model export + ship {v['ship_s']:.1f} s, "
            f"job {v['job_s']:.1f} s)"
            for k, v in fixed.items()
        ),
        "",
        "| rows | master | wall s | rows/s (wall) | job rows/s | steady rows/s | model | "
        "Python rest | model load | Spark (JVM, Arrow, IO) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['rows']:,} | {r['master']} | {r['wall_s']:.1f} | {r['rows_per_s']:,.0f} | "
            f"**{r['job_rows_per_s']:,.0f}** | {_rate(r['steady_rows_per_s'])} | {r['share_model']:.0%} | "
            f"{r['share_python_rest']:.0%} | {r['share_load']:.1%} | {r['share_spark']:.0%} |"
        )
    lines += [
        "",
        "rows/s (wall): from process start to exit, JVM start included. Job rows/s: once the session is up and "
        "the model shipped (read, Python workers start and load the model, score, write). Steady: the job less "
        "a 1,000-row job. Shares: of the job's task-slot time (job seconds x cores); the model and the rest of "
        "Python (Arrow to NumPy, checks, Arrow out) are timed in the workers, Spark is the remainder.",
        "",
    ]
    lines += ["| target | rows | measured | |", "|---|---:|---:|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['rows']:,} | {t['measured']:.2f}x | {'met' if t['met'] else 'NOT met'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(*argv[1:5])))
        return 0
    from benchmarks.http import run_meta
    from models.store import served_tag

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1000000,5000000", help="comma-separated sizes")
    p.add_argument("--masters", default="local[1],local[2]")
    p.add_argument("--runs", type=int, default=1, help="runs per size and master (median)")
    p.add_argument("--no-jobs", action="store_true", help="leave out the jobs API's rate")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    a = p.parse_args(argv)
    import bentoml

    tag = str(bentoml.models.get(served_tag()).tag)
    sizes = [int(s) for s in a.rows.split(",")]
    masters = a.masters.split(",")
    meta = run_meta("spark", argv, tag=tag)
    print(meta["machine"], "| commit", meta["commit"], "| model", tag)
    work = Path(tempfile.mkdtemp(prefix="bench-spark-"))
    try:
        files = {n: write_parquet(n, work, seed=n) for n in [FIXED_ROWS, *sizes]}
        print(f"model in process on {min(sizes[0], 300_000):,} rows ...")
        model = model_rates(files[sizes[0]], tag, rows=min(sizes[0], 300_000))
        print(
            f"  model {model['model_rows_per_s']:,.0f} rows/s, whole batch {model['score_batch_rows_per_s']:,.0f} rows/s"
        )
        fixed = {}
        for master in masters:
            fixed[master] = spark_run(master, files[FIXED_ROWS], tag)
            print(f"  fixed cost {master}: {fixed[master]['wall_s']:.1f} s")
        runs = []
        for i, n in enumerate(sizes):
            order = masters if i % 2 == 0 else masters[::-1]
            by_master: dict[str, list[dict]] = {m: [] for m in masters}
            for _ in range(a.runs):
                for master in order:
                    r = spark_run(master, files[n], tag)
                    assert r["rows"] == n, r
                    by_master[master].append(r)
                    print(f"  {n:,} rows {master}: {r['wall_s']:.1f} s wall, job {r['job_s']:.1f} s")
                order = order[::-1]
            for master in masters:
                walls = [r["wall_s"] for r in by_master[master]]
                median = by_master[master][walls.index(statistics.median_low(walls))]
                runs.append(_row(median, fixed[master]))
        jobs = None if a.no_jobs else jobs_rate()
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    targets = []
    one, two = masters[0], masters[-1]
    for n in sizes:
        r1 = next(r for r in runs if r["rows"] == n and r["master"] == one)
        r2 = next(r for r in runs if r["rows"] == n and r["master"] == two)
        # Judged on the steady rate (the start-up costs are reported on their own), or on the job's
        # rate when a run is too short to take a 1,000-row job's time off it.
        key = "steady_rows_per_s" if r1["steady_rows_per_s"] and r2["steady_rows_per_s"] else "job_rows_per_s"
        rate = "steady" if key == "steady_rows_per_s" else "job"
        scaling = r2[key] / r1[key]
        versus_model = r2[key] / (2 * model["model_rows_per_s"])
        targets.append(
            {"target": f"{two} / {one}, {rate} rows/s >= 1.6", "rows": n, "measured": scaling, "met": scaling >= 1.6}
        )
        targets.append(
            {
                "target": f"{two} {rate} rows/s / (2 x the model's single-core rate) >= 0.7",
                "rows": n,
                "measured": versus_model,
                "met": versus_model >= 0.7,
            }
        )
    results = {"model": model, "fixed": fixed, "runs": runs, "jobs": jobs, "targets": targets}
    table = markdown(results, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "spark.md").write_text(table + "\n")
    (a.out / "spark.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print()
    print(table)
    print(f"\nwrote {a.out / 'spark.md'}, spark.json")
    return 0 if all(t["met"] for t in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
