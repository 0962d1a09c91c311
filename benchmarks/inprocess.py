"""In-process prediction speed: scikit-learn pipeline vs the ONNX-compiled pipeline.

    PYTHONPATH=. .venv/bin/python -m benchmarks.inprocess [--fast] [--seconds S] [--out PATH]

Prints a Markdown report (machine, versions, compile time, ONNX size, parity, latency and
throughput for 1 / 100 / 10,000-row inputs, single-row calls/s from 1, 2, 4 and 8 threads) and
writes it to reports/bench_inprocess.md. Every path runs on one intra-op thread; the threaded
table shows what several request threads sharing one model get.

scikit-learn is timed on a prebuilt DataFrame (what it needs); the compiled model on tuples of
values (``predict_proba_rows``, the service's row format) for one row, so its time includes
building the inputs, and on the same DataFrame for bigger inputs. The model is the served one,
from the model store (``load_pipeline()``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from threadpoolctl import threadpool_limits

from models.onnx_session import CompiledModel
from models.schema import FEATURE_NAMES, FEATURES, TARGET, frame_from_rows, validate_frame
from models.store import distribution_version
from training.onnx_export import compile_pipeline, learner_parity, parity_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "Churn_Modelling.csv"
REPORT = ROOT / "reports" / "bench_inprocess.md"
PACKAGES = ("numpy", "pandas", "scikit-learn", "xgboost", "lightgbm", "onnx", "onnxruntime")
THREADS = (1, 2, 4, 8)


def load_pipeline(fast: bool = False) -> tuple[object, str]:
    """The fitted pipeline to benchmark, and a line saying where it came from: the served
    model from the store (BANKCHURN_MODEL_TAG, default bank_churn:latest), or with --fast a
    small model fitted here (a smoke run that needs no trained model)."""
    if not fast:
        from models.store import get_stored, load_bundle
        from serving.settings import Settings

        bundle = load_bundle(get_stored(Settings().model_tag))
        return bundle.pipeline, f"{bundle.tag} from the model store (the served model)"
    from sklearn.model_selection import train_test_split

    from models.ensemble import build_pipeline

    data = validate_frame(pd.read_csv(DATA))
    train, _ = train_test_split(data, test_size=0.2, stratify=data[TARGET], random_state=42)
    pipe = build_pipeline(42, fast=True)
    start = time.perf_counter()
    pipe.fit(train[list(FEATURE_NAMES)], train[TARGET])
    return (
        pipe,
        f"build_pipeline(42, fast=True) fitted here on an 80% stratified split, {time.perf_counter() - start:.1f} s",
    )


# ---------------------------------------------------------------- measuring


def _time_calls(fn: Callable[[int], object], seconds: float) -> tuple[float, float, float]:
    """Seconds per call of fn(i), i = 0, 1, 2, ...: (wall median, wall best, CPU median) over ~10 blocks.

    CPU time is this thread's (every path here computes on the calling thread), so it is what a
    call costs even when other processes share the cores; wall time is what a caller waits.
    """
    fn(0)
    start = time.perf_counter()
    fn(1)
    once = max(time.perf_counter() - start, 1e-7)
    per_block = max(1, int(seconds / 10 / once))
    blocks, cpu, i = [], [], 0
    deadline = time.perf_counter() + seconds
    while len(blocks) < 3 or (time.perf_counter() < deadline and len(blocks) < 10):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(per_block):
            fn(i)
            i += 1
        cpu.append((time.thread_time() - start_cpu) / per_block)
        blocks.append((time.perf_counter() - start) / per_block)
    return statistics.median(blocks), min(blocks), statistics.median(cpu)


def _threaded_calls_per_second(
    predict_one: Callable[[int], object], n_rows: int, threads: int, seconds: float
) -> tuple[float, float]:
    """(calls/s, process CPU seconds per call): `threads` threads sharing one model, each calling
    single rows for `seconds`."""
    barrier = threading.Barrier(threads + 1)

    def worker(offset: int) -> int:
        calls, i = 0, offset
        barrier.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            predict_one(i % n_rows)
            calls += 1
            i += 7
        return calls

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(worker, t * 1013) for t in range(threads)]
        barrier.wait()
        start, start_cpu = time.perf_counter(), time.process_time()
        total = sum(f.result() for f in futures)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return total / elapsed, cpu / total


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere); both benchmarks print it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _machine() -> list[str]:
    model = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    versions = ", ".join(f"{p} {distribution_version(p)}" for p in PACKAGES)
    return [
        f"- CPU: {model}; {os.cpu_count()} logical cores ({usable} usable); load average at start {load}",
        f"- Python {platform.python_version()} on {platform.system()} {platform.machine()}; {versions}",
    ]


def _rows(frame: pd.DataFrame) -> list[tuple]:
    kinds = [f.kind for f in FEATURES]
    return [
        tuple(int(v) if k in ("int", "flag") else v for v, k in zip(rec, kinds, strict=True))
        for rec in frame[list(FEATURE_NAMES)].itertuples(index=False, name=None)
    ]


# ---------------------------------------------------------------- report


def run(fast: bool, seconds: float) -> str:
    lines = ["# In-process prediction: scikit-learn vs ONNX Runtime (compiled pipeline)", ""]
    lines += _machine()
    pipe, source = load_pipeline(fast)
    start = time.perf_counter()
    onnx_bytes = compile_pipeline(pipe)
    compile_s = time.perf_counter() - start
    model = CompiledModel(onnx_bytes, threads=1)
    lines += [
        f"- Model: {source}",
        f"- Compile: {compile_s:.2f} s, ONNX {len(onnx_bytes) / 1e6:.2f} MB; session: 1 intra-op thread, sequential",
        "",
    ]

    data = validate_frame(pd.read_csv(DATA))
    frame = data[list(FEATURE_NAMES)]
    rows = _rows(frame)

    # Parity on every row of the CSV.
    expected = pipe.predict_proba(frame)[:, 1]
    got = model.predict_proba_frame(frame)
    half = parity_report(pipe, model, data, 0.5)
    low = parity_report(pipe, model, data, 0.3)
    per_learner = learner_parity(pipe, model, data)
    lines += [
        "## Parity (all 10,000 rows of data/Churn_Modelling.csv)",
        "",
        "| max abs diff | mean abs diff | bit-identical rows | decision mismatches @0.5 | @0.3 | passed (≤ 1e-6) |",
        "|---|---|---|---|---|---|",
        f"| {half['max_abs_diff']:.3g} | {half['mean_abs_diff']:.3g} | {int((got == expected).sum())} "
        f"| {half['decision_mismatches']} | {low['decision_mismatches']} | {half['passed'] and low['passed']} |",
        "",
        "Per base learner, max abs diff of P(1): "
        + ", ".join(f"{name} {diff:.3g}" for name, diff in per_learner.items())
        + f". Rows where compiled < scikit-learn: {int((got < expected).sum())}"
        " (a threshold equal to such a row's scikit-learn probability would flip that one row).",
        "",
    ]

    # Latency and throughput, one thread.
    table = [
        "## Latency and throughput (one thread)",
        "",
        "| rows per call | path | wall ms/call (median) | wall ms/call (best) | CPU ms/call (median) "
        "| rows/s (wall, median) | rows/s (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    # Single rows cycle through different customers: repeating one row keeps every tree's path
    # in the branch predictor and cache and roughly halves the compiled time, flattering it.
    n_single = 500
    one_frames = [frame.iloc[i : i + 1] for i in range(n_single)]
    one_dicts = [[dict(zip(FEATURE_NAMES, r, strict=True))] for r in rows[:n_single]]
    cases: list[tuple[int, str, Callable[[int], object]]] = [
        (1, "scikit-learn, prebuilt 1-row DataFrame", lambda i: pipe.predict_proba(one_frames[i % n_single])),
        (
            1,
            "scikit-learn, DataFrame built per call",
            lambda i: pipe.predict_proba(frame_from_rows(one_dicts[i % n_single])),
        ),
        (1, "compiled, predict_proba_rows([tuple])", lambda i: model.predict_proba_rows([rows[i % len(rows)]])),
    ]
    for n in (100, 10_000):
        part, part_rows = frame.iloc[:n], rows[:n]
        cases += [
            (n, "scikit-learn, DataFrame", lambda i, part=part: pipe.predict_proba(part)),
            (n, "compiled, predict_proba_frame", lambda i, part=part: model.predict_proba_frame(part)),
            (n, "compiled, predict_proba_rows", lambda i, part_rows=part_rows: model.predict_proba_rows(part_rows)),
        ]
    for n, path, fn in cases:
        median, best, cpu = _time_calls(fn, seconds)
        table.append(
            f"| {n:,} | {path} | {median * 1e3:.3f} | {best * 1e3:.3f} | {cpu * 1e3:.3f} "
            f"| {n / median:,.0f} | {n / cpu:,.0f} |"
        )
    lines += [*table, ""]

    # Single-row calls from several threads sharing one model.
    paths = {
        "scikit-learn (prebuilt 1-row DataFrame)": lambda i: pipe.predict_proba(one_frames[i % n_single]),
        "compiled (predict_proba_rows)": lambda i: model.predict_proba_rows([rows[i]]),
    }
    header = "| path | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in THREADS) + " |"
    lines += [
        f"## Single-row calls/s from a ThreadPoolExecutor ({seconds:g} s per cell, one shared model)",
        "",
        header,
        "|---|" + "---|" * len(THREADS),
    ]
    for name, fn in paths.items():
        n_rows = n_single if name.startswith("scikit") else len(rows)
        cells = [_threaded_calls_per_second(fn, n_rows, t, seconds) for t in THREADS]
        lines.append(f"| {name}: calls/s | " + " | ".join(f"{rate:,.0f}" for rate, _ in cells) + " |")
        lines.append(f"| {name}: CPU ms per call | " + " | ".join(f"{cpu * 1e3:.3f}" for _, cpu in cells) + " |")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines += [
        "",
        f"Load average at the end: {load}. Notes: medians over ~10 timing blocks per cell; on a shared machine 'best' is the least"
        " disturbed block. Single-row calls cycle through different customers. Threads beyond the core"
        " count only queue; ONNX Runtime releases the GIL while it runs, scikit-learn mostly holds it.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="small model and 0.5 s cells (a smoke run)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per timing cell (default 2, fast 0.5)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"Markdown output (default {REPORT.relative_to(ROOT)}; with --fast, printed only unless given)",
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.5 if args.fast else 2.0)
    out = args.out if args.out is not None else (None if args.fast else REPORT)
    # One thread for every numeric library (BLAS, OpenMP): one core against one core.
    with threadpool_limits(limits=1):
        report = run(args.fast, seconds)
    print(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report + "\n")
        print(f"(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
