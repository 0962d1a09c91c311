"""HTTP benchmark: the bare framework, the seeds' pattern and our service, loaded the same way.

    python -m benchmarks.http            # or: make bench
    python -m benchmarks.http --duration 5 --connections 1,50

For each service it starts `bentoml serve` pinned to CPU 0 (one core, like a 1000m pod), warms
it up, then runs wrk pinned to CPU 1 at each connection count with the same rotating set of
real customers from the dataset. It prints req/s, p50/p95/p99 and errors per cell, the ratios
ours/bare and ours/seed, checks the targets, and writes a Markdown table, JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.inprocess import cpu_model
from models.schema import FEATURE_NAMES, json_customer
from tests.helpers import ROOT, ServeProcess
from training.data import load_data

SERVICES = {
    "bare": ("benchmarks.bare_service:Bare", "bare BentoML async endpoint, same schema, no model"),
    "seed": ("benchmarks.seed_service:SeedPattern", "seeds' pattern: sync sklearn predict, 4 threads"),
    "ours": ("service:BankChurn", "BankChurn /predict"),
}
TARGETS = {"throughput_ratio_at_50": 0.70, "p99_ratio_at_50": 2.0}

LUA = r"""
local bodies = {%(bodies)s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%d %%f %%f %%f\n", summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def write_script(n: int) -> Path:
    rows = load_data()[list(FEATURE_NAMES)].sample(n, random_state=1).to_dict(orient="records")
    bodies = ",\n".join(json.dumps(json.dumps({"customer": json_customer(r)})) for r in rows)
    path = Path(tempfile.mkdtemp(prefix="bench-")) / "predict.lua"
    path.write_text(LUA % {"bodies": bodies})
    return path


def run_wrk(url: str, script: Path, connections: int, duration: float, cpu: str | None) -> dict:
    cmd = [*(["taskset", "-c", cpu] if cpu else []), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s"]
    cmd += ["--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    requests, micros, connect, read, write, status, timeout, p50, p95, p99 = line.split()[1:]
    errors = sum(int(x) for x in (connect, read, write, status, timeout))
    return {
        "connections": connections,
        "requests": int(requests),
        "rps": int(requests) / (int(micros) / 1e6),
        "p50_ms": float(p50) / 1000,
        "p95_ms": float(p95) / 1000,
        "p99_ms": float(p99) / 1000,
        "errors": errors,
        "non_2xx": int(status),
        "timeouts": int(timeout),
    }


def tree_rss_mb(pid: int) -> dict[str, float]:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    per = {f"{p.pid}:{' '.join(p.cmdline()[1:4])[:60]}": p.memory_info().rss / 2**20 for p in procs if p.is_running()}
    return {"total_mb": sum(per.values()), "largest_process_mb": max(per.values()), "processes": len(per)}


def bench_service(name: str, script: Path, levels: list[int], duration: float, pin: bool) -> dict:
    target, description = SERVICES[name]
    server = ServeProcess(target=target, prefix=("taskset", "-c", "0") if pin else ())
    server.start()
    try:
        ready_s = server.wait_ready(120)
        run_wrk(server.url, script, 10, 3, "1" if pin else None)  # warm-up, not recorded
        rss = tree_rss_mb(server.proc.pid)
        cells = []
        for c in levels:
            cell = run_wrk(server.url, script, c, duration, "1" if pin else None)
            cells.append(cell)
            print(
                f"  {name:<5} c={c:<4} {cell['rps']:8.1f} req/s  p50 {cell['p50_ms']:7.1f} ms  "
                f"p95 {cell['p95_ms']:7.1f} ms  p99 {cell['p99_ms']:7.1f} ms  errors {cell['errors']}",
                flush=True,
            )
        backend = None
        if name == "ours":
            backend = httpx.post(f"{server.url}/model_card", json={}, timeout=10).json()["serving_backend"]
        return {"description": description, "ready_seconds": ready_s, "rss": rss, "cells": cells, "backend": backend}
    finally:
        server.stop()


def ratios(results: dict) -> list[dict]:
    out = []
    for i, cell in enumerate(results["ours"]["cells"]):
        bare, seed = results["bare"]["cells"][i], results["seed"]["cells"][i]
        out.append(
            {
                "connections": cell["connections"],
                "ours_over_bare_rps": cell["rps"] / bare["rps"],
                "ours_over_seed_rps": cell["rps"] / seed["rps"],
                "ours_over_bare_p99": cell["p99_ms"] / bare["p99_ms"],
            }
        )
    return out


def markdown(results: dict, rat: list[dict], meta: dict) -> str:
    lines = [
        f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}; "
        f"server pinned to 1 core: {meta['pinned']}; wrk 1 thread, {meta['duration']} s per cell.",
        f"Command: `{meta['command']}`",
        "",
        "| service | conns | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        for c in res["cells"]:
            lines.append(
                f"| {name} | {c['connections']} | {c['rps']:.0f} | {c['p50_ms']:.1f} | {c['p95_ms']:.1f} | "
                f"{c['p99_ms']:.1f} | {c['errors']} |"
            )
    lines += ["", "| conns | ours/bare req/s | ours/seed req/s | ours/bare p99 |", "|---:|---:|---:|---:|"]
    for r in rat:
        lines.append(
            f"| {r['connections']} | {r['ours_over_bare_rps']:.2f} | {r['ours_over_seed_rps']:.1f}x | "
            f"{r['ours_over_bare_p99']:.2f} |"
        )
    lines += ["", "| serving process (after warm-up) | RSS of the process tree | largest process |", "|---|---:|---:|"]
    for name, res in results.items():
        lines.append(f"| {name} | {res['rss']['total_mb']:.0f} MB | {res['rss']['largest_process_mb']:.0f} MB |")
    return "\n".join(lines)


def check_targets(results: dict, rat: list[dict]) -> list[str]:
    verdicts = []
    at50 = next((r for r in rat if r["connections"] == 50), None)
    if at50:
        ok = at50["ours_over_bare_rps"] >= TARGETS["throughput_ratio_at_50"]
        verdicts.append(
            f"{'PASS' if ok else 'FAIL'} throughput at 50 conns: ours/bare = {at50['ours_over_bare_rps']:.2f} (>= 0.70)"
        )
        ok = at50["ours_over_bare_p99"] <= TARGETS["p99_ratio_at_50"]
        verdicts.append(
            f"{'PASS' if ok else 'FAIL'} p99 at 50 conns: ours/bare = {at50['ours_over_bare_p99']:.2f} (<= 2.0)"
        )
    errors = sum(c["errors"] for c in results["ours"]["cells"])
    verdicts.append(f"{'PASS' if errors == 0 else 'FAIL'} errors at every level: {errors}")
    return verdicts


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        conns = [c["connections"] for c in res["cells"]]
        a.plot(conns, [c["rps"] for c in res["cells"]], "o-", label=name)
        b.plot(conns, [c["p99_ms"] for c in res["cells"]], "o-", label=name)
    a.set(xlabel="concurrent connections", ylabel="req/s", title="Throughput", xscale="log")
    b.set(xlabel="concurrent connections", ylabel="p99 latency (ms)", title="p99 latency", xscale="log", yscale="log")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "http.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--connections", default="1,10,50,100")
    p.add_argument("--services", default="bare,seed,ours")
    p.add_argument("--payloads", type=int, default=200, help="distinct customers rotated through")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server/wrk to CPU 0/1")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    a = p.parse_args(argv)
    if shutil.which("wrk") is None:
        p.error("wrk is not installed: apt-get install wrk")
    pin = a.pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    levels = [int(x) for x in a.connections.split(",")]
    script = write_script(a.payloads)
    meta = {
        "machine": machine(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "pinned": pin,
        "duration": a.duration,
        "command": "python -m benchmarks.http " + " ".join(argv if argv is not None else os.sys.argv[1:]),
    }
    print(meta["machine"], "| commit", meta["commit"])
    results = {}
    for name in a.services.split(","):
        print(f"{name}: {SERVICES[name][1]}")
        results[name] = bench_service(name, script, levels, a.duration, pin)
    a.out.mkdir(parents=True, exist_ok=True)
    rat = ratios(results) if {"bare", "seed", "ours"} <= set(results) else []
    table = markdown(results, rat, meta)
    verdicts = check_targets(results, rat) if rat else []
    (a.out / "http.md").write_text(table + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n")
    (a.out / "http.json").write_text(json.dumps({"meta": meta, "results": results, "ratios": rat}, indent=2))
    plot(results, a.out)
    print()
    print(table)
    print()
    print("\n".join(verdicts))
    print(f"\nwrote {a.out / 'http.md'}, http.json, http.png")
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
