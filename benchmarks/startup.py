"""Start-up benchmark: how soon a new pod serves, and what it costs in memory, side by side.

    python -m benchmarks.startup              # or: make bench (after the HTTP benchmark)
    python -m benchmarks.startup --runs 5 --servers bare,ours,ours-sklearn

Servers, each a `bentoml serve` pinned to CPU 0 (one core, like a 1000m pod):

- bare: benchmarks.bare_service:Bare, an `async def` @bentoml.api with the same pydantic
  request schema and a constant answer (no model, no pandas): the framework's own start-up;
- ours: service:BankChurn as shipped (the compiled model);
- ours-sklearn (optional): the same with BANKCHURN_USE_COMPILED=false, the fallback, which
  needs the `sklearn` extra.

They run alternately, --runs times each, the order rotating every round (bare, ours; ours,
bare; ...), each after the previous server's processes have all exited, so slow drifts of a
shared machine fall on all of them. Each run measures:

- cold start: from launching the process to the first `GET /readyz` answering 200 (polled
  every 10 ms from CPU 1); and the CPU time the tree used until then (user + system: the
  start-up work itself, less sensitive than the wall time to other load on a shared machine);
- RSS: the sum over the serving process tree (arbiter + worker) after --requests POST
  /predict requests with real customers (from CPU 1, 10 keep-alive connections).

It prints each run, the medians per server, the ratio and difference of ours to bare, and
the issue's targets (cold start <= 1.25x bare; RSS <= bare + 150 MB), and writes
reports/bench/startup.{md,json}. Figures, not a test: the exit status is 0 whatever they are
unless a server failed to start.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from benchmarks.http import bodies_for, run_meta
from harness.servers import ROOT, ServeProcess

SERVERS = {
    "bare": ("benchmarks.bare_service:Bare", {}, "bare BentoML endpoint: pydantic schema, constant answer"),
    "ours": ("service:BankChurn", {}, "BankChurn as shipped (compiled model)"),
    "ours-sklearn": ("service:BankChurn", {"BANKCHURN_USE_COMPILED": "false"}, "BankChurn, scikit-learn fallback"),
}
TARGET_COLD_RATIO = 1.25  # ours / bare
TARGET_RSS_EXTRA_MB = 150  # ours - bare


def wait_ready(server: ServeProcess, started: float, timeout: float) -> float:
    """Seconds from `started` to the first 200 from GET /readyz."""
    while time.monotonic() - started < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.target} exited with {server.proc.returncode}:\n{server.log()[-3000:]}")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=1)
        try:
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.01)
    raise RuntimeError(f"{server.target} not ready after {timeout}s:\n{server.log()[-3000:]}")


def send_requests(port: int, bodies: list[bytes], n: int, connections: int = 10) -> tuple[int, int]:
    """`n` POST /predict requests over `connections` keep-alive connections -> (sent, non-200)."""

    def client(count: int) -> tuple[int, int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        bad = 0
        for i in range(count):
            conn.request("POST", "/predict", body=bodies[i % len(bodies)], headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            bad += response.status != 200
        conn.close()
        return count, bad

    shares = [n // connections + (i < n % connections) for i in range(connections)]
    with ThreadPoolExecutor(connections) as pool:
        results = list(pool.map(client, shares))
    return sum(r[0] for r in results), sum(r[1] for r in results)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process tree has used: start-up work, whatever the wait."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def tree_rss(pid: int) -> dict:
    """RSS of a process and all its descendants, in MB, total and per process."""
    root = psutil.Process(pid)
    per = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            role = "worker" if "_bentoml_impl.worker" in cmd else ("arbiter" if p.pid == pid else p.name())
            per[f"{role}:{p.pid}"] = p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return {"total_mb": sum(per.values()), "processes": per}


def one_run(name: str, bodies: list[bytes], a: argparse.Namespace) -> dict:
    target, env, _ = SERVERS[name]
    server = ServeProcess(target=target, env={"BANKCHURN_MODEL_TAG": a.model_tag, **env}, prefix=("taskset", "-c", "0"))
    started = time.monotonic()
    server.start()
    try:
        cold = wait_ready(server, started, a.timeout)
        cpu = tree_cpu(server.proc.pid)
        sent, bad = send_requests(server.port, bodies, a.requests)
        time.sleep(0.5)  # let the last responses' buffers settle
        rss = tree_rss(server.proc.pid)
    finally:
        tree = psutil.Process(server.proc.pid).children(recursive=True) if server.proc.poll() is None else []
        server.stop()
        # The next server must not start while this one's worker is still exiting on the same core.
        _, alive = psutil.wait_procs(tree, timeout=15)
        for proc in alive:
            proc.kill()
        time.sleep(1)
    return {
        "server": name,
        "cold_start_s": cold,
        "cpu_to_ready_s": cpu,
        "rss_mb": rss["total_mb"],
        "processes": rss["processes"],
        "requests": sent,
        "non_2xx": bad,
    }


def summarize(runs: list[dict], names: list[str]) -> dict:
    out = {}
    for name in names:
        mine = [r for r in runs if r["server"] == name]
        workers = [v for r in mine for k, v in r["processes"].items() if k.startswith("worker:")]
        arbiters = [v for r in mine for k, v in r["processes"].items() if k.startswith("arbiter:")]
        out[name] = {
            "runs": len(mine),
            "cold_start_s": statistics.median(r["cold_start_s"] for r in mine),
            "cold_start_range_s": [min(r["cold_start_s"] for r in mine), max(r["cold_start_s"] for r in mine)],
            "cpu_to_ready_s": statistics.median(r["cpu_to_ready_s"] for r in mine),
            "rss_mb": statistics.median(r["rss_mb"] for r in mine),
            "rss_range_mb": [min(r["rss_mb"] for r in mine), max(r["rss_mb"] for r in mine)],
            "arbiter_rss_mb": statistics.median(arbiters) if arbiters else None,
            "worker_rss_mb": statistics.median(workers) if workers else None,
        }
    return out


def verdicts(summary: dict) -> list[str]:
    if "bare" not in summary or "ours" not in summary:
        return []
    bare, ours = summary["bare"], summary["ours"]
    ratio = ours["cold_start_s"] / bare["cold_start_s"]
    extra = ours["rss_mb"] - bare["rss_mb"]
    return [
        f"{'PASS' if ratio <= TARGET_COLD_RATIO else 'FAIL'} cold start: ours {ratio:.2f}x bare "
        f"({ours['cold_start_s'] - bare['cold_start_s']:+.2f} s; target <= {TARGET_COLD_RATIO}x)",
        f"{'PASS' if extra <= TARGET_RSS_EXTRA_MB else 'FAIL'} RSS: ours = bare {extra:+.0f} MB "
        f"({ours['rss_mb'] / bare['rss_mb']:.2f}x; target <= bare + {TARGET_RSS_EXTRA_MB} MB)",
    ]


def markdown(summary: dict, runs: list[dict], checks: list[str], meta: dict) -> str:
    bare = summary.get("bare")
    lines = [
        f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}; load average at start "
        f"{meta['loadavg']}; each server pinned to CPU 0, client on CPU 1; {meta['runs']} alternating runs "
        f"per server; RSS after {meta['requests']} POST /predict.",
        f"Command: `{meta['command']}`",
        "",
        "| server | cold start (median) | range | CPU to ready | RSS arbiter + worker (median) | range | arbiter "
        "| worker | cold start vs bare | CPU vs bare | RSS vs bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        vs_cold = vs_cpu = vs_rss = "—"
        if bare and name != "bare":
            vs_cold = (
                f"{s['cold_start_s'] / bare['cold_start_s']:.2f}x ({s['cold_start_s'] - bare['cold_start_s']:+.2f} s)"
            )
            vs_rss = f"{s['rss_mb'] / bare['rss_mb']:.2f}x ({s['rss_mb'] - bare['rss_mb']:+.0f} MB)"
            vs_cpu = f"{s['cpu_to_ready_s'] / bare['cpu_to_ready_s']:.2f}x"
        lo, hi = s["cold_start_range_s"]
        rlo, rhi = s["rss_range_mb"]
        lines.append(
            f"| {name} | {s['cold_start_s']:.2f} s | {lo:.2f}–{hi:.2f} | {s['cpu_to_ready_s']:.2f} s "
            f"| {s['rss_mb']:.0f} MB | {rlo:.0f}–{rhi:.0f} | {s['arbiter_rss_mb'] or 0:.0f} MB "
            f"| {s['worker_rss_mb'] or 0:.0f} MB | {vs_cold} | {vs_cpu} | {vs_rss} |"
        )
    lines += [
        "",
        "| run | server | cold start | CPU to ready | RSS | requests | non-2xx |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(
            f"| {i} | {r['server']} | {r['cold_start_s']:.2f} s | {r['cpu_to_ready_s']:.2f} s | {r['rss_mb']:.0f} MB "
            f"| {r['requests']} | {r['non_2xx']} |"
        )
    lines += ["", *(f"- {v}" for v in checks)]
    return "\n".join(lines)


def resolve_model(tag: str) -> str:
    """Pin ':latest' once, so every run of `ours` serves the same model version."""
    import bentoml

    return str(bentoml.models.get(tag).tag)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per server (alternating)")
    p.add_argument("--servers", default="bare,ours", help=f"comma-separated, from {','.join(SERVERS)}")
    p.add_argument("--requests", type=int, default=2000, help="POST /predict before RSS is read")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for /readyz")
    p.add_argument("--model-tag", default=os.environ.get("BANKCHURN_MODEL_TAG", "bank_churn:latest"))
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    a = p.parse_args(argv)
    if shutil.which("taskset") is None:
        p.error("needs taskset (apt-get install util-linux)")
    if (os.cpu_count() or 1) < 2:
        p.error("needs 2 CPUs: the server on CPU 0, the client on CPU 1")
    os.sched_setaffinity(0, {1})  # this process polls /readyz: keep it off the server's core
    names = a.servers.split(",")
    if "bare" not in names:
        names.insert(0, "bare")
    unknown = set(names) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers {sorted(unknown)}")
    a.model_tag = resolve_model(a.model_tag)
    bodies = [b.encode() for b in bodies_for("predict", 200)]
    meta = run_meta(
        "startup",
        argv,
        date=time.strftime("%Y-%m-%d %H:%M"),
        loadavg=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        runs=a.runs,
        requests=a.requests,
        model_tag=a.model_tag,
    )
    print(meta["machine"], "| commit", meta["commit"], "| load", meta["loadavg"], "| model", a.model_tag, flush=True)
    runs = []
    for i in range(a.runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # each server first once in turn
            r = one_run(name, bodies, a)
            runs.append(r)
            procs = ", ".join(f"{k.split(':')[0]} {v:.0f}" for k, v in r["processes"].items())
            print(
                f"  run {i + 1} {name:<13} cold start {r['cold_start_s']:6.2f} s (CPU {r['cpu_to_ready_s']:5.2f} s)   RSS {r['rss_mb']:5.0f} MB ({procs})  "
                f"{r['requests']} requests, {r['non_2xx']} non-2xx",
                flush=True,
            )
    summary = summarize(runs, names)
    checks = verdicts(summary)
    table = markdown(summary, runs, checks, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "startup.md").write_text(table + "\n")
    (a.out / "startup.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    print()
    print(table)
    print(f"\nwrote {a.out / 'startup.md'}, startup.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
