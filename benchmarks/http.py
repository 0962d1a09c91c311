"""HTTP benchmark: the request path of this service against the bare framework, side by side.

    python -m benchmarks.http            # or: make bench
    python -m benchmarks.http --duration 5 --connections 1,50 --servers bare,ours

Each server is a `bentoml serve` pinned to CPU 0 (one core, like a 1000m pod), warmed up, then
loaded by wrk pinned to CPU 1 with the same rotating set of real customers from the dataset:

- bare: an `async def` @bentoml.api with the same pydantic request schema, returning a
  constant (the framework's ceiling with its default configuration);
- seed: the seeds' pattern (sync scikit-learn predict_proba on a 4-thread pool);
- ours-bentoml: this service with POST /predict answered by BentoML's API machinery
  (BANKCHURN_PREDICT_ROUTE=bentoml: the request path before the hot routes);
- ours: this service as shipped;
- fastapi: the hand-written V2 baseline (benchmarks/fastapi_v2.py: one FastAPI route on
  uvicorn with uvloop and httptools, msgspec, models/columns.py, the same predictor called
  inline). It runs beside ours, pinned to the same core, and its cells are measured
  alternately with ours' (an idle server costs the core nothing).

Single-row cases (`predict`; `v2`, the Open Inference Protocol's infer with one row, JSON;
`grpc`, ModelInfer with one row; `fastapi_v2`) run at every connection count (gRPC: that many
calls in flight on one connection, from benchmarks/grpc_load.py pinned to the other core);
the batch cases send 1,000-row requests (`predict_batch`, V2 `v2_batch` in JSON and
`v2_binary_batch` in the binary tensor data extension, `grpc_batch`: the same rows) at
--batch-connections. Cells compared with each other are measured alternately, --rounds times
(median kept). The model's own rate on the batch blocks (no HTTP, same core) is measured too:
the ceiling of any batch path; and the gRPC load generator's own ceiling against a null gRPC
server on the server's core. It prints every cell, the ratios and the targets, and writes
reports/bench/http.{md,json,png}.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.inprocess import cpu_model
from harness.servers import ROOT, ServeProcess, free_port
from harness.v2 import binary_parts
from models.schema import BY_NAME, FEATURE_NAMES, json_customer
from training.data import load_data

SERVERS = {
    "bare": ("benchmarks.bare_service:Bare", {}, "bare BentoML async endpoint, same schema, no model"),
    "seed": ("benchmarks.seed_service:SeedPattern", {}, "seeds' pattern: sync sklearn predict, 4 threads"),
    "ours-bentoml": ("service:BankChurn", {"BANKCHURN_PREDICT_ROUTE": "bentoml"}, "BankChurn, /predict via BentoML"),
    "ours": ("service:BankChurn", {}, "BankChurn as shipped (/predict as a hot route)"),
    "fastapi": ("benchmarks.fastapi_v2", {}, "hand-written FastAPI V2 route, uvicorn + uvloop + httptools"),
}
GRPC = "grpc"  # the path of the gRPC cases: ModelInfer on the server's gRPC port
# case -> (path, rows per request); which cases each server runs
CASES = {
    "predict": ("/predict", 1),
    "v2": ("/v2/models/bank_churn/infer", 1),
    "grpc": (GRPC, 1),
    "fastapi_v2": ("/v2/models/bank_churn/infer", 1),
    "predict_batch": ("/predict_batch", 1000),
    "v2_batch": ("/v2/models/bank_churn/infer", 1000),
    "v2_binary_batch": ("/v2/models/bank_churn/infer", 1000),
    "grpc_batch": (GRPC, 1000),
}
SERVER_CASES = {
    "bare": ("predict",),
    "seed": ("predict",),
    "ours-bentoml": ("predict",),
    # fastapi_v2 runs on the fastapi server, alternately with ours' cells (see bench_server)
    "ours": ("predict", "v2", "grpc", "fastapi_v2", "predict_batch", "v2_batch", "v2_binary_batch", "grpc_batch"),
}
TARGETS = {
    "predict_over_bare_at_50": 1.8,
    "v2_over_predict_at_50": 1.0,
    "grpc_over_v2": 1.0,  # gRPC single row vs REST V2 single row, at every level up to 50
    "v2_over_fastapi": 1.0,  # our V2 single row vs the hand-written route, at every level
    "binary_over_json_rows": 1.0,  # V2 1,000 rows, binary vs JSON
    "grpc_batch_over_model": 0.9,
    "predict_batch_over_model": 0.85,
}

LUA = r"""
local bodies = {%(bodies)s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%d %%f %%f %%f\n", summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""

# The binary tensor data extension: each body with its JSON header's length.
LUA_BINARY = r"""
local bodies = {%(bodies)s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "%(path)s", {["Inference-Header-Content-Length"] = bodies[i][1]}, bodies[i][2])
end
""" + LUA[LUA.index("done = function") :]

V2_DATATYPES = {"int": "INT64", "flag": "INT64", "float": "FP64", "category": "BYTES"}


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def run_meta(module: str, argv: list[str] | None, **settings: object) -> dict:
    """What every report states first: the machine, the commit, the date, the run's own settings
    and the command that made it."""
    return {
        "machine": machine(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        **settings,
        "command": f"python -m benchmarks.{module} " + " ".join(sys.argv[1:] if argv is None else argv),
    }


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


def customers(n: int, seed: int = 1) -> list[dict]:
    rows = load_data()[list(FEATURE_NAMES)].sample(n, random_state=seed, replace=n > 10_000)
    return [json_customer(r) for r in rows.to_dict(orient="records")]


def v2_request(rows: list[dict]) -> dict:
    """An Open Inference Protocol infer request: one [N] input per feature."""
    return {
        "inputs": [
            {
                "name": name,
                "shape": [len(rows)],
                "datatype": V2_DATATYPES[BY_NAME[name].kind],
                "data": [r[name] for r in rows],
            }
            for name in FEATURE_NAMES
        ]
    }


def blocks_of(case: str, payloads: int) -> list[list[dict]]:
    """The rows of each request of a case: single customers, or the same 1,000-row blocks."""
    rows = CASES[case][1]
    return [[r] for r in customers(payloads)] if rows == 1 else [customers(rows, seed=s) for s in range(4)]


def bodies_for(case: str, payloads: int) -> list[str]:
    """JSON request bodies for a case; the batch cases carry the same 1,000-row blocks."""
    blocks = blocks_of(case, payloads)
    if case in ("v2", "fastapi_v2", "v2_batch"):
        return [json.dumps(v2_request(b)) for b in blocks]
    if case == "predict":
        return [json.dumps({"customer": b[0]}) for b in blocks]
    return [json.dumps({"customers": b}) for b in blocks]


def binary_bodies(case: str, payloads: int) -> list[tuple[int, bytes]]:
    """(JSON header length, body) of each V2 request in the binary extension's framing."""
    out = []
    for block in blocks_of(case, payloads):
        head, blobs = binary_parts(v2_request(block))
        header = json.dumps(head).encode()
        out.append((len(header), header + b"".join(blobs)))
    return out


def grpc_requests(case: str, payloads: int) -> list[bytes]:
    """Serialized ModelInferRequests (raw_input_contents, as tritonclient sends them)."""
    from serving.v2 import grpc_predict_v2_pb2 as pb

    out = []
    for block in blocks_of(case, payloads):
        head, blobs = binary_parts(v2_request(block))
        request = pb.ModelInferRequest(model_name="bank_churn", raw_input_contents=blobs)
        for t in head["inputs"]:
            request.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        out.append(request.SerializeToString())
    return out


def _lua_string(data: bytes) -> str:
    """A Lua string literal holding exactly these bytes (3-digit escapes for the rest)."""
    plain = set(range(0x20, 0x7F)) - {ord('"'), ord("\\")}
    return '"' + "".join(chr(b) if b in plain else f"\\{b:03d}" for b in data) + '"'


def write_script(case: str, payloads: int = 200) -> Path:
    """wrk's Lua script for an HTTP case; for a gRPC case, the load generator's requests file."""
    directory = Path(tempfile.mkdtemp(prefix="bench-"))
    if CASES[case][0] == GRPC:
        path = directory / f"{case}.json"
        path.write_text(json.dumps([base64.b64encode(r).decode() for r in grpc_requests(case, payloads)]))
        return path
    if case == "v2_binary_batch":
        bodies = ",\n".join(f'{{"{n}", {_lua_string(b)}}}' for n, b in binary_bodies(case, payloads))
        script = LUA_BINARY % {"bodies": bodies, "path": CASES[case][0]}
    else:
        bodies = ",\n".join(json.dumps(b) for b in bodies_for(case, payloads))
        script = LUA % {"bodies": bodies, "path": CASES[case][0]}
    path = directory / f"{case}.lua"
    path.write_text(script)
    return path


def run_grpc(target: str, requests: Path, concurrency: int, duration: float, cpu: str | None) -> dict:
    """benchmarks/grpc_load.py, pinned like wrk; the same cell fields as run_wrk."""
    cmd = [*(["taskset", "-c", cpu] if cpu else []), sys.executable, "-m", "benchmarks.grpc_load", "load"]
    cmd += ["--target", target, "--requests", str(requests), "--concurrency", str(concurrency)]
    cmd += ["--duration", str(duration)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration + 120)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"grpc_load printed no result:\n{out.stdout}\n{out.stderr[-2000:]}")
    requests_n, seconds, errors, p50, p95, p99 = line.split()[1:]
    return {
        "connections": concurrency,
        "requests": int(requests_n),
        "rps": int(requests_n) / float(seconds),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "errors": int(errors),
        "non_2xx": int(errors),
        "timeouts": 0,
    }


class FastApiProcess:
    """benchmarks/fastapi_v2.py on uvicorn, in its own process (pinned like the servers)."""

    def __init__(self, prefix: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*prefix, sys.executable, "-m", "benchmarks.fastapi_v2", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 120) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fastapi_v2 exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("fastapi_v2 not ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


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


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far."""
    total = 0.0
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _median_cell(cells: list[dict]) -> dict:
    """The round with the median req/s (its latencies with it), and every round's req/s."""
    ranked = sorted(cells, key=lambda c: c["rps"])
    cell = dict(ranked[(len(ranked) - 1) // 2])
    cell["rounds_rps"] = [c["rps"] for c in cells]
    return cell


def bench_server(name: str, scripts: dict[str, Path], levels: list[int], batch_levels: list[int], a) -> dict:
    """Every case of a server at every level. Cases compared with each other (one server's
    single-row cases, its batch cases) are measured alternately, cell by cell, and at the
    targets' levels (50 connections, the batch levels) --rounds times each, alternating, the
    median kept: the machine's speed drifts over minutes, and cases measured one after the
    other would carry that drift into their ratio."""
    target, env, description = SERVERS[name]
    cpu = "1" if a.pin else None
    prefix = ("taskset", "-c", "0") if a.pin else ()
    server = ServeProcess(target=target, env=env, prefix=prefix)
    server.start()
    guest = None
    try:
        ready_s = server.wait_ready(120)
        mine = [case for case in SERVER_CASES[name] if case in scripts]
        if "fastapi_v2" in mine:  # the hand-written baseline beside ours, on the same core
            guest = FastApiProcess(prefix)
            guest.wait_ready()

        def run(case: str, connections: int, duration: float) -> dict:
            # the server's CPU time per request: robust where req/s is not (a shared machine)
            pid = guest.proc.pid if case == "fastapi_v2" and guest is not None else server.proc.pid
            before = tree_cpu_s(pid)
            if CASES[case][0] == GRPC:
                cell = run_grpc(server.grpc_address, scripts[case], connections, duration, cpu)
            else:
                url = guest.url if case == "fastapi_v2" and guest is not None else server.url
                cell = run_wrk(url, scripts[case], connections, duration, cpu)
            cell["cpu_ms_per_request"] = (tree_cpu_s(pid) - before) * 1000 / max(cell["requests"], 1)
            return cell

        for case in mine:
            run(case, 10, 3)  # warm-up, not recorded
        cases: dict[str, list[dict]] = {case: [] for case in mine}
        groups = [(levels, [c for c in mine if CASES[c][1] == 1]), (batch_levels, [c for c in mine if CASES[c][1] > 1])]
        for group_levels, group in groups:
            batch = bool(group) and CASES[group[0]][1] > 1 and name == "ours"
            for c in group_levels if group else []:
                rounds = a.rounds if len(group) > 1 else 1
                measured: dict[str, list[dict]] = {case: [] for case in group}
                for _ in range(rounds):
                    # The model's own rate, measured in every round beside the batch cells (the
                    # server idle, same core): the machine's speed drifts by 10-15% over minutes,
                    # so a batch path is compared with the model as fast as it was then.
                    model = measure_ceiling(a.pin, seconds=3) if batch else None
                    for case in group:
                        cell = run(case, c, a.duration)
                        cell["rows_per_s"] = cell["rps"] * CASES[case][1]
                        if model is not None:
                            cell["model_rows_per_s"] = model["rows_per_s"]
                            cell["vs_model"] = cell["rows_per_s"] / model["rows_per_s"]
                            cell["cpu_vs_model"] = model["cpu_ms_per_call"] / max(cell["cpu_ms_per_request"], 1e-9)
                        measured[case].append(cell)
                for case in group:
                    cell = _median_cell(measured[case])
                    if batch:  # the median of the rounds' own ratios, each round's drift cancelled
                        for key in ("vs_model", "cpu_vs_model", "model_rows_per_s"):
                            cell[f"{key}_rounds"] = [m[key] for m in measured[case]]
                            cell[key] = statistics.median(cell[f"{key}_rounds"])
                    cases[case].append(cell)
                    spread = "" if rounds == 1 else f"  (rounds {', '.join(f'{r:.0f}' for r in cell['rounds_rps'])})"
                    print(
                        f"  {name:<12} {case:<13} c={c:<4} {cell['rps']:8.1f} req/s {cell['rows_per_s']:9.0f} rows/s  "
                        f"p50 {cell['p50_ms']:7.1f} ms  p99 {cell['p99_ms']:7.1f} ms  "
                        f"cpu {cell['cpu_ms_per_request']:.3f} ms/req  errors {cell['errors']}{spread}",
                        flush=True,
                    )
        rss = tree_rss_mb(server.proc.pid)
        return {"description": description, "ready_seconds": ready_s, "rss": rss, "cases": cases}
    finally:
        server.stop()
        if guest is not None:
            guest.stop()


def model_ceiling(rows: int = 1000, seconds: float = 5.0) -> dict:
    """The served model's own rate on the batch cases' blocks: the columns the V2 requests
    carry, scored back to back by the predictor on one thread (no HTTP, no parsing). Run in a
    process pinned like the servers (main() does it), it is the most rows/s any request path
    can reach on that core."""
    from models.predictor import load_predictor
    from models.store import get_stored
    from serving.settings import Settings
    from serving.v2.codec import parse_request

    predictor = load_predictor(get_stored(Settings().model_tag))
    blocks = [parse_request(body.encode(), rows) for body in bodies_for("v2_batch", 0)]
    for b in blocks:
        predictor.predict_columns(b.numeric, b.categorical)
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        b = blocks[calls % len(blocks)]
        predictor.predict_columns(b.numeric, b.categorical)
        calls += 1
    elapsed = time.perf_counter() - start
    return {
        "rows": rows,
        "calls": calls,
        "ms_per_call": elapsed / calls * 1000,
        "cpu_ms_per_call": (time.process_time() - cpu) / calls * 1000,
        "rows_per_s": calls * rows / elapsed,
    }


def measure_ceiling(pin: bool, seconds: float = 5.0) -> dict:
    code = (
        "import json; from benchmarks.http import model_ceiling; "
        f"print('CEILING', json.dumps(model_ceiling(seconds={seconds})))"
    )
    cmd = [*(["taskset", "-c", "0"] if pin else []), sys.executable, "-c", code]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("CEILING ")), None)
    if line is None:
        raise RuntimeError(f"model ceiling: no result\n{out.stdout}\n{out.stderr}")
    return json.loads(line.split(" ", 1)[1])


def grpc_generator_ceiling(pin: bool, levels: list[int], duration: float) -> dict[int, float]:
    """The gRPC load generator's own rate (req/s) against a null server on the servers' core,
    per level: the most any gRPC cell of this run could show."""
    requests = write_script("grpc", 200)
    port = free_port()
    prefix = ["taskset", "-c", "0"] if pin else []
    cmd = [*prefix, sys.executable, "-m", "benchmarks.grpc_load", "null", "--port", str(port)]
    null = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert null.stdout is not None and null.stdout.readline().strip() == "READY"
        target = f"127.0.0.1:{port}"
        return {c: run_grpc(target, requests, c, duration, "1" if pin else None)["rps"] for c in levels}
    finally:
        null.terminate()
        null.wait(30)


def cell_at(results: dict, server: str, case: str, connections: int) -> dict | None:
    cells = results.get(server, {}).get("cases", {}).get(case, [])
    return next((c for c in cells if c["connections"] == connections), None)


def ratio_rows(
    results: dict, levels: list[int], batch_levels: list[int], ceiling: dict | None = None
) -> list[tuple[str, int, float]]:
    """(what, connections, ratio) for every comparison the run has both sides of."""
    pairs = [
        ("ours /predict ÷ bare", ("ours", "predict"), ("bare", "predict"), "rps"),
        ("ours /predict ÷ ours via BentoML", ("ours", "predict"), ("ours-bentoml", "predict"), "rps"),
        ("ours /predict ÷ seed", ("ours", "predict"), ("seed", "predict"), "rps"),
        ("V2 infer (1 row) ÷ /predict", ("ours", "v2"), ("ours", "predict"), "rps"),
        (
            "V2 infer (1,000 rows) ÷ /predict_batch, rows/s",
            ("ours", "v2_batch"),
            ("ours", "predict_batch"),
            "rows_per_s",
        ),
        ("gRPC infer (1 row) ÷ V2 REST infer (1 row)", ("ours", "grpc"), ("ours", "v2"), "rps"),
        ("V2 infer (1 row) ÷ the FastAPI route", ("ours", "v2"), ("ours", "fastapi_v2"), "rps"),
        ("V2 binary (1,000 rows) ÷ V2 JSON, rows/s", ("ours", "v2_binary_batch"), ("ours", "v2_batch"), "rows_per_s"),
        # server CPU per request (lower is better), steadier than req/s on a shared machine
        ("server CPU per request: gRPC ÷ V2 REST (1 row)", ("ours", "grpc"), ("ours", "v2"), "cpu_ms_per_request"),
        ("server CPU per request: V2 ÷ FastAPI (1 row)", ("ours", "v2"), ("ours", "fastapi_v2"), "cpu_ms_per_request"),
        (
            "server CPU per request: V2 binary ÷ V2 JSON (1,000 rows)",
            ("ours", "v2_binary_batch"),
            ("ours", "v2_batch"),
            "cpu_ms_per_request",
        ),
    ]
    out = []
    for what, (s1, c1), (s2, c2), key in pairs:
        for c in batch_levels if CASES[c1][1] > 1 else levels:
            a, b = cell_at(results, s1, c1, c), cell_at(results, s2, c2, c)
            if a and b and b.get(key):
                out.append((what, c, a[key] / b[key]))
    if ceiling:  # how close each batch path comes to the model's own rate on the same core
        for case in ("v2_batch", "v2_binary_batch", "grpc_batch", "predict_batch"):
            for c in batch_levels:
                cell = cell_at(results, "ours", case, c)
                if cell:
                    # measured beside the cell in each round when it was, else the one measurement
                    vs_model = cell.get("vs_model", cell["rows_per_s"] / ceiling["rows_per_s"])
                    out.append((f"{case} rows/s ÷ the model's own (no HTTP)", c, vs_model))
                    if cell.get("cpu_ms_per_request") and ceiling.get("cpu_ms_per_call"):
                        # the share of the server's CPU per request that is the model's own work
                        cpu = cell.get("cpu_vs_model", ceiling["cpu_ms_per_call"] / cell["cpu_ms_per_request"])
                        out.append((f"{case}: the model's CPU ÷ the server's CPU per request", c, cpu))
    return out


def check_targets(
    results: dict, ratios: list[tuple[str, int, float]], batch_levels: list[int], levels: list[int]
) -> list[str]:
    def ratio(what: str, c: int) -> float | None:
        return next((r for w, conns, r in ratios if w == what and conns == c), None)

    checks = [
        ("ours /predict ÷ bare", 50, TARGETS["predict_over_bare_at_50"], "/predict req/s at 50 connections vs bare"),
        ("V2 infer (1 row) ÷ /predict", 50, TARGETS["v2_over_predict_at_50"], "V2 single-row req/s vs /predict at 50"),
        *(
            (
                "gRPC infer (1 row) ÷ V2 REST infer (1 row)",
                c,
                TARGETS["grpc_over_v2"],
                f"gRPC 1-row req/s vs V2 REST at {c}",
            )
            for c in levels
            if c <= 50
        ),
        *(
            ("V2 infer (1 row) ÷ the FastAPI route", c, TARGETS["v2_over_fastapi"], f"V2 1-row req/s vs FastAPI at {c}")
            for c in levels
        ),
        *(
            (
                "V2 binary (1,000 rows) ÷ V2 JSON, rows/s",
                c,
                TARGETS["binary_over_json_rows"],
                f"V2 binary vs JSON 1,000-row rows/s at {c}",
            )
            for c in batch_levels
        ),
        *(
            (
                "grpc_batch rows/s ÷ the model's own (no HTTP)",
                c,
                TARGETS["grpc_batch_over_model"],
                f"gRPC 1,000-row rows/s vs the model in process at {c}",
            )
            for c in batch_levels
        ),
        *(
            (
                "predict_batch rows/s ÷ the model's own (no HTTP)",
                c,
                TARGETS["predict_batch_over_model"],
                f"/predict_batch 1,000-row rows/s vs the model in process at {c}",
            )
            for c in batch_levels
        ),
    ]
    verdicts = []
    for what, c, target, label in checks:
        r = ratio(what, c)
        if r is not None:
            verdicts.append(f"{'PASS' if r >= target else 'FAIL'} {label}: {r:.2f}x (target >= {target}x)")
    if "ours" in results:
        errors = sum(cell["errors"] for cells in results["ours"]["cases"].values() for cell in cells)
        verdicts.append(f"{'PASS' if errors == 0 else 'FAIL'} errors in every cell of ours: {errors}")
    return verdicts


def markdown(results: dict, ratios: list[tuple[str, int, float]], verdicts: list[str], meta: dict) -> str:
    lines = [
        f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}; "
        f"server pinned to 1 core: {meta['pinned']}; wrk 1 thread, {meta['duration']} s per cell.",
        f"Command: `{meta['command']}`",
        "",
        "| server | case | rows/request | conns | req/s | rows/s | p50 ms | p95 ms | p99 ms | server CPU ms/request | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        for case, cells in res["cases"].items():
            for c in cells:
                lines.append(
                    f"| {name} | {case} | {CASES[case][1]} | {c['connections']} | {c['rps']:.0f} | "
                    f"{c['rows_per_s']:.0f} | {c['p50_ms']:.1f} | {c['p95_ms']:.1f} | {c['p99_ms']:.1f} | "
                    f"{c.get('cpu_ms_per_request', float('nan')):.3f} | {c['errors']} |"
                )
    if meta.get("model_ceiling"):
        m = meta["model_ceiling"]
        lines += [
            "",
            f"The model alone on the same core (predictor.predict_columns on the same 1,000-row blocks, no HTTP): "
            f"{m['rows_per_s']:.0f} rows/s, {m['ms_per_call']:.1f} ms per block "
            f"({m.get('cpu_ms_per_call', float('nan')):.1f} ms of CPU), measured after the cells.",
        ]
        per_round = [
            (case, c)
            for case, cells in results.get("ours", {}).get("cases", {}).items()
            for c in cells
            if "model_rows_per_s_rounds" in c
        ]
        if per_round:
            rates = sorted({round(r) for _, c in per_round for r in c["model_rows_per_s_rounds"]})
            lines += [
                f"It was also measured in every round of the batch cells, just before them (3 s, the server idle): "
                f"{', '.join(f'{r:,}' for r in rates)} rows/s; each batch cell's ratio to the model below is "
                f"the median of its rounds' ratios to that round's rate."
            ]
    if meta.get("grpc_generator_ceiling"):
        ceiling = ", ".join(f"{r:.0f} at {c}" for c, r in meta["grpc_generator_ceiling"].items())
        lines += [
            f"The gRPC load generator (benchmarks/grpc_load.py, on the load core) against a null gRPC server on the "
            f"server's core: {ceiling} req/s: the most a gRPC cell could show."
        ]
    lines += [
        "fastapi_v2: the hand-written FastAPI route (benchmarks/fastapi_v2.py) beside ours on the same core, "
        "its cells measured alternately with ours'."
    ]
    rounds = sorted({len(c.get("rounds_rps", [])) for r in results.values() for cs in r["cases"].values() for c in cs})
    if rounds and rounds[-1] > 1:
        lines += [
            f"Cells compared with each other (ours' single-row cases at each level, its batch cases) were "
            f"measured {rounds[-1]} times alternately; the median round is shown."
        ]
    lines += ["", "| ratio | conns | value |", "|---|---:|---:|"]
    lines += [f"| {what} | {c} | {r:.2f}x |" for what, c, r in ratios]
    lines += ["", "| serving process (after the run) | RSS of the process tree | largest process |", "|---|---:|---:|"]
    for name, res in results.items():
        lines.append(f"| {name} | {res['rss']['total_mb']:.0f} MB | {res['rss']['largest_process_mb']:.0f} MB |")
    lines += ["", *(f"- {v}" for v in verdicts)]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        for case, cells in res["cases"].items():
            if CASES[case][1] != 1:
                continue
            conns = [c["connections"] for c in cells]
            label = f"{name} {case}"
            a.plot(conns, [c["rps"] for c in cells], "o-", label=label)
            b.plot(conns, [c["p99_ms"] for c in cells], "o-", label=label)
    a.set(xlabel="concurrent connections", ylabel="req/s", title="Single-row throughput", xscale="log")
    b.set(xlabel="concurrent connections", ylabel="p99 latency (ms)", title="p99 latency", xscale="log", yscale="log")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "http.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--connections", default="1,10,50,100", help="single-row cases")
    p.add_argument("--batch-connections", default="4", help="1,000-row cases")
    p.add_argument("--servers", default="bare,seed,ours-bentoml,ours")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--payloads", type=int, default=200, help="distinct customers rotated through")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the compared cells")
    p.add_argument("--no-generator-ceiling", dest="generator_ceiling", action="store_false")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server/wrk to CPU 0/1")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    a = p.parse_args(argv)
    if shutil.which("wrk") is None:
        p.error("wrk is not installed: apt-get install wrk")
    a.pin = a.pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    levels = [int(x) for x in a.connections.split(",")]
    batch_levels = [int(x) for x in a.batch_connections.split(",")]
    scripts = {case: write_script(case, a.payloads) for case in a.cases.split(",")}
    meta = run_meta("http", argv, pinned=a.pin, duration=a.duration)
    print(meta["machine"], "| commit", meta["commit"])
    results = {}
    for name in a.servers.split(","):
        print(f"{name}: {SERVERS[name][2]}")
        results[name] = bench_server(name, scripts, levels, batch_levels, a)
    ceiling = None
    if "ours" in results and any(CASES[c][1] > 1 for c in results["ours"]["cases"]):
        ceiling = measure_ceiling(a.pin)
        print(f"model ceiling: {ceiling['rows_per_s']:.0f} rows/s ({ceiling['ms_per_call']:.1f} ms per 1,000 rows)")
    generator = None
    if a.generator_ceiling and any(CASES[c][0] == GRPC for c in results.get("ours", {}).get("cases", {})):
        generator = grpc_generator_ceiling(a.pin, levels, a.duration)
        print("gRPC load generator vs a null server:", ", ".join(f"c={c}: {r:.0f} req/s" for c, r in generator.items()))
    ratios = ratio_rows(results, levels, batch_levels, ceiling)
    verdicts = check_targets(results, ratios, batch_levels, levels)
    meta["model_ceiling"] = ceiling
    meta["grpc_generator_ceiling"] = generator
    table = markdown(results, ratios, verdicts, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "http.md").write_text(table + "\n")
    (a.out / "http.json").write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2))
    plot(results, a.out)
    print()
    print(table)
    print(f"\nwrote {a.out / 'http.md'}, http.json, http.png")
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
