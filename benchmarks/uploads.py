"""Hostile-upload benchmark: memory of the serving process tree while clients upload hostile
CSV files of 40-60 MiB at once to POST /jobs.

    python -m benchmarks.uploads                     # ours: the default upload limit (2) and 4
    python -m benchmarks.uploads --before /tmp/before  # + the same attack on another checkout,
                                                       #   e.g. `git worktree add /tmp/before <commit>`

Real parts only: `bentoml serve service:BankChurn` (embedded job store, one job worker), raw
files of the sizes given, httpx clients in threads, psutil sampling the RSS of the arbiter
and its worker every 20 ms. The files, one per client:

    commas          48 MiB of commas on one line (millions of empty columns)
    wide-header     a 1,000,000-column header, 40 MiB
    huge-field      a valid header, then one 60 MiB field
    open-quote      a valid header, a row, then a quote never closed (40 MiB)

and, alone afterwards, one file the service accepts, to bound a job worker's memory:

    garbage-rows    55 MiB of rows whose every kept cell is 100 characters of garbage: the
                    job is accepted and every row is reported as an error, chunk by chunk

Each line of the table: the peak RSS of the process tree above its idle RSS (measured just
before), the answers, the slowest answer, whether any process of the tree died. Figures from
a shared machine are noisy; the lead reruns them on a quiet one. Writes reports/bench/uploads.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from benchmarks.http import run_meta
from harness.fleet import wait_for_job
from harness.servers import ROOT, ServeProcess
from models.schema import FEATURE_NAMES, ID_COLUMN

MIB = 1 << 20
HEADER = ",".join([ID_COLUMN, *FEATURE_NAMES]).encode()
ROW = b"15634602,619,France,Female,42,2,0.0,1,1,1,101348.88"


def hostile_files(directory: Path) -> dict[str, Path]:
    """The four attack files (written once, reused)."""
    makers = {
        "commas": lambda f: f.write(b"," * (48 * MIB)),
        "wide-header": lambda f: f.write(b",".join(b"column_%033d" % i for i in range(1_000_000))),
        "huge-field": lambda f: (f.write(HEADER + b"\n"), f.write(b"7" * (60 * MIB)), f.write(b"\n")),
        "open-quote": lambda f: (f.write(HEADER + b"\n" + ROW + b'\n"'), f.write(b"x,y\n" * (10 * MIB))),
    }
    return {name: _file(directory / f"{name}.csv", make) for name, make in makers.items()}


def garbage_file(directory: Path) -> Path:
    cell = b"g" * 100
    row = b",".join([cell] * (1 + len(FEATURE_NAMES))) + b"\n"
    return _file(
        directory / "garbage-rows.csv", lambda f: (f.write(HEADER + b"\n"), f.write(row * (55 * MIB // len(row))))
    )


def _file(path: Path, make) -> Path:
    if not path.exists():
        with open(path, "wb") as f:
            make(f)
    return path


class TreeRss:
    """Peak RSS of a process and its children, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.02):
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self.pids = self.tree_pids()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def tree_pids(self) -> set[int]:
        return {self.root.pid, *(c.pid for c in self.root.children(recursive=True))}

    def now(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every_s)

    def __enter__(self) -> TreeRss:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def upload(url: str, path: Path, results: list, media: str) -> None:
    started = time.monotonic()
    try:
        with open(path, "rb") as f:
            if media == "text/csv":
                r = httpx.post(f"{url}/jobs", content=f, headers={"content-type": "text/csv"}, timeout=600)
            else:
                r = httpx.post(f"{url}/jobs", files={"file": (path.name, f, "text/csv")}, timeout=600)
        error = r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else ""
        results.append(
            {"file": path.stem, "status": r.status_code, "seconds": time.monotonic() - started, "error": error[:160]}
        )
    except httpx.HTTPError as exc:
        results.append({"file": path.stem, "status": type(exc).__name__, "seconds": time.monotonic() - started})


def attack(server: ServeProcess, files: list[Path], media: str) -> dict:
    """All files uploaded at once, one client each; the tree's RSS sampled meanwhile."""
    time.sleep(2)  # settle
    rss = TreeRss(server.proc.pid)
    idle = rss.now()
    results: list[dict] = []
    threads = [threading.Thread(target=upload, args=(server.url, p, results, media)) for p in files]
    with rss:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    alive = server.proc.poll() is None and rss.tree_pids() == rss.pids
    return {"idle_mb": idle / 1e6, "peak_mb": rss.peak / 1e6, "above_idle_mb": (rss.peak - idle) / 1e6,
            "results": sorted(results, key=lambda r: r["file"]), "all_alive": alive}  # fmt: skip


def accepted_garbage(server: ServeProcess, path: Path) -> dict:
    """The one hostile file that becomes a job: upload, then score it, RSS sampled throughout."""
    time.sleep(2)
    rss = TreeRss(server.proc.pid)
    idle = rss.now()
    with rss:
        started = time.monotonic()
        with open(path, "rb") as f:
            r = httpx.post(f"{server.url}/jobs", files={"file": (path.name, f, "text/csv")}, timeout=600)
        accepted = time.monotonic() - started
        status = wait_for_job(server.url, r.json()["job_id"], timeout=900) if r.status_code == 202 else {}
        scored = time.monotonic() - started
    return {"idle_mb": idle / 1e6, "peak_mb": rss.peak / 1e6, "above_idle_mb": (rss.peak - idle) / 1e6,
            "status": r.status_code, "accepted_s": accepted, "done_s": scored, "rows_total": status.get("rows_total"),
            "rows_failed": status.get("rows_failed"), "all_alive": server.proc.poll() is None}  # fmt: skip


def run_server(root: Path, limit: int, files: dict[str, Path], garbage: Path, media: str) -> dict:
    env = {"BANKCHURN_MAX_CONCURRENT_UPLOADS": str(limit), "BANKCHURN_JOB_WORKERS": "1"}
    with_server = ServeProcess(env=env, root=root).start()
    try:
        with_server.wait_ready(180)
        return {
            "attack": attack(with_server, list(files.values()), media),
            "garbage": accepted_garbage(with_server, garbage),
        }
    finally:
        with_server.stop()


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"Machine: {meta['machine']} (shared, noisy); commit {meta['commit']}; {meta['date']}. Command: `{meta['command']}`",
        "",
        "4 clients upload at once: 48 MiB of commas, a 1,000,000-column header (40 MiB), a 60 MiB field, "
        f"an unclosed quote (40 MiB); {meta['media']} bodies. RSS of the `bentoml serve` tree (arbiter + worker).",
        "",
        "| server | idle MB | peak MB | peak above idle MB | answers | slowest answer s | every process alive |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for name, r in results.items():
        a = r["attack"]
        answers = ", ".join(f"{k}x {v}" for k, v in sorted(Counter(str(x["status"]) for x in a["results"]).items()))
        slowest = max(x["seconds"] for x in a["results"])
        lines.append(
            f"| {name} | {a['idle_mb']:.0f} | {a['peak_mb']:.0f} | **{a['above_idle_mb']:.0f}** | {answers} | "
            f"{slowest:.1f} | {a['all_alive']} |"
        )
    lines += ["", "Answers, file by file:", ""]
    for name, r in results.items():
        for x in r["attack"]["results"]:
            lines.append(f"- {name}, {x['file']}: {x['status']} in {x['seconds']:.1f} s: {x.get('error', '')}")
    garbage = {n: r["garbage"] for n, r in results.items() if "garbage" in r}
    if garbage:
        lines += [
            "",
            "A 55 MiB file of rows whose every kept cell is 100 characters of garbage (accepted: every row an error), "
            "uploaded and scored by the job worker in the same process:",
            "",
            "| server | idle MB | peak MB | peak above idle MB | rows | accepted in s | done in s | alive |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, g in garbage.items():
            lines.append(
                f"| {name} | {g['idle_mb']:.0f} | {g['peak_mb']:.0f} | **{g['above_idle_mb']:.0f}** | "
                f"{g['rows_total']} | {g['accepted_s']:.1f} | {g['done_s']:.1f} | {g['all_alive']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, help="another checkout to attack the same way (e.g. main)")
    p.add_argument("--media", choices=["multipart", "text/csv"], default="multipart")
    p.add_argument("--files", type=Path, default=Path("/tmp/bank-churn-hostile"), help="where the files are made")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    a = p.parse_args(argv)
    meta = run_meta("uploads", argv, media=a.media)
    a.files.mkdir(parents=True, exist_ok=True)
    files, garbage = hostile_files(a.files), garbage_file(a.files)
    print(meta["machine"], "| commit", meta["commit"])
    results = {}
    for name, root, limit in [
        ("ours, BANKCHURN_MAX_CONCURRENT_UPLOADS=2 (default)", ROOT, 2),
        ("ours, BANKCHURN_MAX_CONCURRENT_UPLOADS=4", ROOT, 4),
        *([(f"before ({a.before})", a.before, 4)] if a.before else []),
    ]:
        print(f"{name} ...", flush=True)
        results[name] = run_server(root, limit, files, garbage, a.media)
        at = results[name]["attack"]
        print(f"  peak {at['peak_mb']:.0f} MB, {at['above_idle_mb']:.0f} MB above idle; {at['results']}")
    table = markdown(results, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "uploads.md").write_text(table + "\n")
    (a.out / "uploads.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print()
    print(table)
    ours = [r["attack"] for n, r in results.items() if n.startswith("ours")]
    bounded = all(x["above_idle_mb"] < 400 and x["all_alive"] for x in ours)
    print(f"\n{'PASS' if bounded else 'FAIL'}: peak under 400 MB above idle and nothing killed, for ours")
    return 0 if bounded else 1


if __name__ == "__main__":
    raise SystemExit(main())
