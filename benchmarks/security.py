"""Security benchmark: what the edge's protections cost on /predict, and how it holds under
header attacks.

    python -m benchmarks.security            # or: make bench
    python -m benchmarks.security --duration 5 --rounds 3 --slow-connections 3000

Three `bentoml serve` of this service, all pinned to CPU 0 (one core, like a 1000m pod) and
loaded by wrk pinned to CPU 1, with the same 200 real customers:

- plain-http: authentication off, uvicorn's stock httptools protocol (no header limits): the
  service before this benchmark's protections;
- auth-off: as shipped without a keys file (the header limits on);
- auth-on: as shipped with a keys file of --keys keys, every request sending
  `Authorization: Bearer <key>`.

Each round measures the three *alone* (one loaded at a time, in alternating order) and
*together* (all three loaded at once, so that whatever else the machine runs slows them alike,
each getting about a third of the core). Every cell also records the CPU time the server's
processes spent per request (user + system), steadier than req/s on a shared machine. The
ratios auth-on ÷ auth-off (the cost of the key check; target >= 0.97) and auth-off ÷
plain-http (the cost of the header limits) are the medians of the rounds' ratios. The key
check alone is also timed in-process (Guard.admit on a /predict request's headers, the
quickest of 7 runs), and the auth-on worker is sampled by py-spy under load: the key check's
share of its CPU, and the header-limit protocol's, are the costs the side-by-side cells should
find (those cells move by several percent from round to round on a shared machine).

Then, on auth-on with the default BANKCHURN_HEADER_TIMEOUT_S (10 s): a 16 MiB header block
(answer, bytes taken in, time), and --slow-connections connections that start a request and
send a header byte every second (slowloris), while /predict is called in a loop: the time
until the server has closed them all, and /predict's answers meanwhile.
Writes reports/bench/security.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from benchmarks.http import bodies_for, run_meta, run_wrk
from benchmarks.profile import IDLE_LEAVES, worker_pid
from harness.servers import ROOT, ServeProcess
from harness.slowloris import big_header, raise_open_files_limit, slow_headers
from serving.keys import key_line, new_key

SERVERS = {
    "plain-http": ("benchmarks.plain_http_service:BankChurn", False, "auth off, uvicorn's stock protocol"),
    "auth-off": ("service:BankChurn", False, "as shipped, no keys file"),
    "auth-on": ("service:BankChurn", True, "as shipped, keys file, Bearer key on every request"),
}
TARGET_AUTH_RATIO = 0.97

LUA = r"""
local bodies = {%(bodies)s}
local headers = {["Content-Type"] = "application/json"%(auth)s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/predict", headers, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%d %%f %%f %%f\n", summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def keys_file(count: int) -> tuple[Path, str]:
    """A keys file of `count` keys (the last one's key returned): the check compares every one."""
    keys = [new_key() for _ in range(count)]
    path = Path(tempfile.mkdtemp(prefix="bench-keys-")) / "api-keys"
    path.write_text("\n".join(key_line(f"client-{i}", ["predict"], k) for i, k in enumerate(keys)) + "\n")
    return path, keys[-1]


def script(key: str | None, payloads: int) -> Path:
    bodies = ",\n".join(json.dumps(b) for b in bodies_for("predict", payloads))
    auth = f', ["Authorization"] = "Bearer {key}"' if key else ""
    path = Path(tempfile.mkdtemp(prefix="bench-")) / f"predict-{'key' if key else 'open'}.lua"
    path.write_text(LUA % {"bodies": bodies, "auth": auth})
    return path


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a server's process tree so far."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def measure(server: ServeProcess, script: Path, connections: int, duration: float, cpu: str | None) -> dict:
    """A wrk cell, with the server's CPU time per request over it."""
    before = cpu_seconds(server.proc.pid)
    cell = run_wrk(server.url, script, connections, duration, cpu)
    cell["cpu_us_per_request"] = (cpu_seconds(server.proc.pid) - before) / max(cell["requests"], 1) * 1e6
    return cell


def report(r: int, name: str, c: int, cell: dict, how: str) -> None:
    print(
        f"  round {r + 1} {how:<8} {name:<10} c={c:<3} {cell['rps']:8.1f} req/s  {cell['cpu_us_per_request']:6.1f} "
        f"CPU us/request  p50 {cell['p50_ms']:6.1f} ms  p99 {cell['p99_ms']:6.1f} ms  errors {cell['errors']}",
        flush=True,
    )


def edge_shares(server: ServeProcess, script: Path, seconds: float, cpu: str | None) -> dict:
    """Where the edge's protections show in a loaded worker's CPU: py-spy samples (100 Hz,
    idle pool threads left out) of the worker under wrk, the share inside the key check
    (Guard.admit, inclusive) and the share in the header-limit protocol's own frames (its
    overrides' own time: what it adds to uvicorn's protocol)."""
    out = Path(tempfile.mkdtemp(prefix="pyspy-")) / "raw.txt"
    load = threading.Thread(target=run_wrk, args=(server.url, script, 50, seconds + 4, cpu))
    load.start()
    time.sleep(2)
    spy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
    options = ["--duration", str(int(seconds)), "--rate", "100", "--format", "raw", "--nonblocking", "-o", str(out)]
    subprocess.run(
        [spy, "record", "--pid", str(worker_pid(server)), *options],
        capture_output=True,
        timeout=seconds + 60,
    )
    load.join()
    total = check = protocol = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_LEAVES):
            continue
        total += int(n)
        check += int(n) * any("admit (serving/edge/guard.py" in f for f in frames)
        protocol += int(n) * ("(serving/edge/protocol.py" in frames[-1])
    return {"samples": total, "key_check": check / max(total, 1), "protocol_own": protocol / max(total, 1)}


def check_cost_us(path: Path, key: str, calls: int = 50_000) -> float:
    """Microseconds per key check of a /predict request, in this process (one core)."""
    from serving.auth import KeyRing
    from serving.edge.guard import Guard

    guard = Guard(KeyRing(path))
    scope = {
        "path": "/predict",
        "headers": [
            (b"host", b"127.0.0.1:3000"),
            (b"content-type", b"application/json"),
            (b"content-length", b"250"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
    }
    best = float("inf")
    for _ in range(7):  # the quickest of 7 runs: what other load on the machine did not slow down
        start = time.perf_counter()
        for _ in range(calls):
            guard.admit(scope)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk cell")
    p.add_argument("--connections", default="50", help="wrk connections per cell, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the three servers' cells")
    p.add_argument(
        "--mode",
        choices=("alternate", "together", "both"),
        default="both",
        help="cells one server at a time (alternating), all three loaded at once, or both",
    )
    p.add_argument("--keys", type=int, default=20, help="keys in the keys file")
    p.add_argument("--profile-seconds", type=float, default=20, help="py-spy recording of the auth-on worker")
    p.add_argument("--slow-connections", type=int, default=3000)
    p.add_argument("--payloads", type=int, default=200)
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    a = p.parse_args(argv)
    if shutil.which("wrk") is None:
        p.error("wrk is not installed: apt-get install wrk")
    a.pin = a.pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (finally) on kill too
    limit = raise_open_files_limit(a.slow_connections * 2 + 1000)
    levels = [int(c) for c in a.connections.split(",")]
    path, key = keys_file(a.keys)
    scripts = {False: script(None, a.payloads), True: script(key, a.payloads)}
    meta = run_meta("security", argv, pinned=a.pin, duration=a.duration, rounds=a.rounds, mode=a.mode, keys=a.keys)
    print(meta["machine"], "| commit", meta["commit"])
    cpu = "1" if a.pin else None
    servers: dict[str, ServeProcess] = {}
    cells: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name in SERVERS}
    together: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name in SERVERS}
    attacks: dict = {}
    try:
        for name, (target, auth, _) in SERVERS.items():
            env = {"BANKCHURN_API_KEYS_FILE": str(path)} if auth else {}
            servers[name] = ServeProcess(target=target, env=env, prefix=("taskset", "-c", "0") if a.pin else ())
            servers[name].start()
        for name, server in servers.items():
            server.wait_ready(120)
            run_wrk(server.url, scripts[SERVERS[name][1]], 10, 3, cpu)  # warm-up, not recorded
        for r in range(a.rounds):
            for c in levels:
                if a.mode in ("alternate", "both"):
                    order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))  # none always first
                    for name in order:
                        cells[name][c].append(measure(servers[name], scripts[SERVERS[name][1]], c, a.duration, cpu))
                        report(r, name, c, cells[name][c][-1], "alone")
                if a.mode in ("together", "both"):
                    # All three loaded at once on their shared core: whatever else the machine
                    # runs slows them alike, and each gets about a third of the core, so their
                    # req/s and CPU per request compare directly.
                    with ThreadPoolExecutor(len(servers)) as pool:
                        futures = {
                            name: pool.submit(measure, server, scripts[SERVERS[name][1]], c, a.duration, cpu)
                            for name, server in servers.items()
                        }
                    for name, future in futures.items():
                        together[name][c].append(future.result())
                        report(r, name, c, together[name][c][-1], "together")
        guarded = servers["auth-on"]
        shares = edge_shares(guarded, scripts[True], a.profile_seconds, cpu)
        print(
            f"py-spy, auth-on worker under load: key check {shares['key_check'] * 100:.2f}% of its samples, "
            f"header-limit protocol's own frames {shares['protocol_own'] * 100:.2f}% ({shares['samples']} samples)"
        )
        for name in ("plain-http", "auth-off"):  # the attacks run alone on the machine
            servers.pop(name).stop()
        attack = big_header(guarded.port)
        attacks["big_header"] = {
            "answer": attack.status_line.decode("latin-1"),
            "taken_in_bytes": attack.sent_bytes,
            "seconds": attack.seconds,
        }
        print(f"16 MiB header: {attack.status_line!r} after {attack.seconds * 1000:.0f} ms")
        with httpx.Client(base_url=guarded.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            body = json.loads(bodies_for("predict", 1)[0])
            slow = slow_headers(
                guarded.port,
                a.slow_connections,
                give_up_s=120,
                probe=lambda: client.post("/predict", json=body).status_code,
            )
        print(slow.summary())
        latencies = sorted(t for _, t in slow.answers)
        attacks["slow_headers"] = {
            "connections": slow.connections,
            "header_timeout_s": 10.0,
            "open_files_limit": limit,
            "opening_s": slow.opening_s,
            "closed": slow.closed,
            "all_closed_s": slow.all_closed_s,
            "lifetime_s": {
                "min": slow.lifetimes_s[0] if slow.lifetimes_s else None,
                "median": slow.lifetimes_s[len(slow.lifetimes_s) // 2] if slow.lifetimes_s else None,
                "max": slow.lifetimes_s[-1] if slow.lifetimes_s else None,
            },
            "predict_answers": len(slow.answers),
            "predict_statuses": sorted({s for s, _ in slow.answers}),
            "predict_median_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
            "predict_max_ms": latencies[-1] * 1000 if latencies else None,
        }
    finally:
        for server in servers.values():
            server.stop()

    check_us = check_cost_us(path, key)
    print(f"the key check alone, in-process: {check_us:.2f} us per request")
    sets = {how: by for how, by in (("alone", cells), ("together", together)) if any(by["auth-on"].values())}

    def ratio(by: dict, one: str, other: str, c: int, key: str) -> float:
        # per round (a round's cells are seconds apart, or simultaneous), then the median
        return median([x[key] / y[key] for x, y in zip(by[one][c], by[other][c], strict=True)])

    ratios = []  # (what, how, connections, value): 1.0 = no cost, lower = slower
    for how, by in sets.items():
        for c in levels:
            ratios += [
                ("auth-on ÷ auth-off, req/s (the key check)", how, c, ratio(by, "auth-on", "auth-off", c, "rps")),
                (
                    "auth-off ÷ auth-on, CPU per request (the key check)",
                    how,
                    c,
                    ratio(by, "auth-off", "auth-on", c, "cpu_us_per_request"),
                ),
                ("auth-off ÷ plain-http, req/s (header limits)", how, c, ratio(by, "auth-off", "plain-http", c, "rps")),
                (
                    "plain-http ÷ auth-off, CPU per request (header limits)",
                    how,
                    c,
                    ratio(by, "plain-http", "auth-off", c, "cpu_us_per_request"),
                ),
            ]
    predict_cpu_us = median([x["cpu_us_per_request"] for x in next(iter(sets.values()))["auth-off"][levels[-1]]])
    verdicts = [
        f"{'PASS' if r >= TARGET_AUTH_RATIO else 'FAIL'} /predict with a key ÷ without, {what.split(', ')[1]}, "
        f"servers {how}, {c} connections: {r:.3f} (target >= {TARGET_AUTH_RATIO})"
        for what, how, c, r in ratios
        if what.endswith("(the key check)")
    ]
    slow = attacks["slow_headers"]
    verdicts.append(
        f"{'PASS' if slow['closed'] == slow['connections'] and slow['predict_statuses'] == [200] else 'FAIL'} "
        f"{slow['closed']} of {slow['connections']} slow-header connections closed by the server; "
        f"/predict answered {slow['predict_statuses']} meanwhile"
    )
    lines = [
        f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}; servers pinned to 1 core: "
        f"{meta['pinned']}; wrk 1 thread, {meta['duration']} s per cell, {meta['rounds']} rounds; "
        f"{meta['keys']} keys in the file. *alone*: one server loaded at a time, alternating; *together*: "
        "the three loaded at once on their shared core.",
        f"Command: `{meta['command']}`",
        "",
        "| server | cells | conns | req/s (median) | CPU µs per request (median) | req/s by round |",
        "|---|---|---:|---:|---:|---|",
    ]
    for how, by in sets.items():
        for name, per_level in by.items():
            for c, cs in per_level.items():
                rps = median([x["rps"] for x in cs])
                cpu_us = median([x["cpu_us_per_request"] for x in cs])
                rounds = ", ".join(f"{x['rps']:.0f}" for x in cs)
                lines.append(f"| {name} ({SERVERS[name][2]}) | {how} | {c} | {rps:.0f} | {cpu_us:.0f} | {rounds} |")
    lines += [
        "",
        "| ratio (median of the rounds' ratios; 1.0 = no cost) | cells | conns | value |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {what} | {how} | {c} | {r:.3f} |" for what, how, c, r in ratios]
    lines += [
        "",
        f"The key check alone (Guard.admit on a /predict request's headers, {a.keys} keys, in-process, the "
        f"quickest of 7 runs): {check_us:.2f} µs per request, {check_us / predict_cpu_us * 100:.2f}% of the "
        f"{predict_cpu_us:.0f} µs of server CPU a /predict request takes (auth-off, median).",
        "",
        f"In the auth-on worker under wrk (py-spy, 100 Hz, {shares['samples']} samples): the key check is "
        f"{shares['key_check'] * 100:.2f}% of its CPU samples, the header-limit protocol's own frames "
        f"{shares['protocol_own'] * 100:.2f}%.",
    ]
    big = attacks["big_header"]
    lines += [
        "",
        f"16 MiB header block: `{big['answer'] or '(closed)'}` after {big['seconds'] * 1000:.0f} ms, "
        f"{big['taken_in_bytes'] // 1024} KiB sent before the server answered.",
        "",
        f"Slowloris, header timeout 10 s (the default): {slow['connections']} connections opened in "
        f"{slow['opening_s']:.2f} s, each sending a header byte a second; {slow['closed']} closed by the server, "
        f"the last {slow['all_closed_s']:.1f} s after the first was opened; lifetimes min "
        f"{slow['lifetime_s']['min']:.1f} / median {slow['lifetime_s']['median']:.1f} / max "
        f"{slow['lifetime_s']['max']:.1f} s. /predict meanwhile: {slow['predict_answers']} answers "
        f"{slow['predict_statuses']}, median {slow['predict_median_ms']:.0f} ms, slowest {slow['predict_max_ms']:.0f} ms."
        if slow["all_closed_s"]
        else f"Slowloris: only {slow['closed']} of {slow['connections']} connections closed within 120 s.",
        "",
        *(f"- {v}" for v in verdicts),
    ]
    table = "\n".join(lines)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "security.md").write_text(table + "\n")
    (a.out / "security.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "cells": {"alone": cells, "together": together},
                "ratios": ratios,
                "check_us": check_us,
                "py_spy_shares": shares,
                "attacks": attacks,
            },
            indent=2,
        )
    )
    print()
    print(table)
    print(f"\nwrote {a.out / 'security.md'}, security.json")
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
