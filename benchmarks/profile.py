"""Where a /predict request's time goes in a loaded worker: py-spy samples, split by owner.

    python -m benchmarks.profile                       # both request paths, 10 s each
    python -m benchmarks.profile --routes hot --seconds 20

For each request path (`bentoml`: POST /predict through BentoML's API machinery, the path
before the hot routes; `hot`: the hot route in front of it, the default) it starts
`bentoml serve service:BankChurn` pinned to CPU 0, loads it with wrk on CPU 1 (50
connections, real customers), and records the worker with py-spy (all threads, 100 Hz,
idle samples dropped). Each sample is charged to the frame nearest the leaf that belongs to
an owner:

- model: ONNX Runtime running the graph (the inference pool thread);
- ours: this repository's code (models/, serving/, service.py), including the libraries it
  calls (pydantic validation, orjson, prometheus_client from our telemetry);
- bentoml: BentoML's server code and the ASGI middleware it wraps every request in
  (OpenTelemetry, timeout, access log, Prometheus metrics), and what they call;
- server: uvicorn, the HTTP parser (h11 / httptools), Starlette routing, the event loop.

It prints the split per path, their request rates, and writes reports/bench/profile.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

from benchmarks.http import run_meta, run_wrk, write_script
from harness.servers import ROOT, ServeProcess

# Owners by file path, checked from the leaf frame towards the root; the first frame with an
# owner takes the sample. py-spy prints paths relative to site-packages or the working
# directory (the repository root), e.g. "predict (serving/online.py:60)".
OWNERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("(onnxruntime/",)),
    ("ours", ("(models/", "(serving/", "(service.py")),
    ("bentoml", ("(bentoml/", "(_bentoml_impl/", "(_bentoml_sdk/", "(opentelemetry/", "(simple_di/")),
    (
        "server",
        ("(uvicorn/", "(h11/", "(httptools/", "(starlette/", "(anyio/", "(asyncio/", "(uvloop/", "(concurrent/"),
    ),
)
CATEGORIES = ("bentoml", "server", "ours", "model", "other")


def owner_of(stack: list[str]) -> str:
    """The owner of one sampled stack (frames root first, as py-spy's raw format gives them)."""
    for frame in reversed(stack):
        for owner, fragments in OWNERS:
            if any(f in frame for f in fragments):
                return owner
    return "other"


# A pool thread blocked on its work queue: py-spy does not always see it as idle.
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py",)


def split(raw: str) -> tuple[Counter, int]:
    """Samples per owner from py-spy's raw (collapsed) output; idle pool threads left out."""
    counts: Counter = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_LEAVES):
            continue
        counts[owner_of(frames)] += int(n)
        total += int(n)
    return counts, total


def worker_pid(server: ServeProcess) -> int:
    """The serving worker (the process that imports the service and runs the event loop)."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    workers = [p for p in children if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker, found {[p.cmdline() for p in children]}")
    return workers[0].pid


def profile_route(route: str, script: Path, seconds: float) -> dict:
    server = ServeProcess(env={"BANKCHURN_PREDICT_ROUTE": route}, prefix=("taskset", "-c", "0"))
    server.start()
    try:
        server.wait_ready(120)
        run_wrk(server.url, script, 50, 3, "1")  # warm-up
        out = Path(tempfile.mkdtemp(prefix="pyspy-")) / "raw.txt"
        spy = subprocess.Popen(
            [
                shutil.which("py-spy") or str(Path(__file__).parents[1] / ".venv/bin/py-spy"),
                "record",
                "--pid",
                str(worker_pid(server)),
                "--duration",
                str(int(seconds)),
                "--rate",
                "100",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        load = run_wrk(server.url, script, 50, seconds, "1")
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err}")
        counts, total = split(out.read_text())
        return {
            "route": route,
            "rps": load["rps"],
            "errors": load["errors"],
            "samples": total,
            "share": {c: counts[c] / total if total else 0.0 for c in CATEGORIES},
        }
    finally:
        server.stop()


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}; worker pinned to 1 core, "
        f"wrk at 50 connections on the other; py-spy 100 Hz over {meta['seconds']} s, idle samples dropped.",
        f"Command: `{meta['command']}`",
        "",
        "| POST /predict answered by | req/s | samples | BentoML middleware | HTTP server + loop | ours | model | other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["share"]
        lines.append(
            f"| {r['route']} | {r['rps']:.0f} | {r['samples']} | {s['bentoml']:.0%} | {s['server']:.0%} | "
            f"{s['ours']:.0%} | {s['model']:.0%} | {s['other']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routes", default="bentoml,hot")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    a = p.parse_args(argv)
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")
    script = write_script("predict", 200)
    meta = run_meta("profile", argv, seconds=a.seconds)
    results = [profile_route(route, script, a.seconds) for route in a.routes.split(",")]
    table = markdown(results, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "profile.md").write_text(table + "\n")
    (a.out / "profile.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
