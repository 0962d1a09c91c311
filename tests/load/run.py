"""Run a named Locust profile headless and summarise it.

python -m tests.load.run {smoke,load,stress,ci} [--host URL] [--p95-ms N]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# users, spawn rate per second, duration: the seeds' profiles plus a short one for CI.
PROFILES = {
    "smoke": (6, 6, "30s"),
    "load": (50, 10, "2m"),
    "stress": (100, 20, "2m"),
    "ci": (20, 20, "15s"),
}


def summarise(prefix: Path) -> dict:
    with open(f"{prefix}_stats.csv") as fh:
        rows = {r["Name"]: r for r in csv.DictReader(fh)}
    agg = rows["Aggregated"]
    return {
        "requests": int(agg["Request Count"]),
        "failures": int(agg["Failure Count"]),
        "rps": float(agg["Requests/s"]),
        "p50_ms": float(agg["50%"]),
        "p95_ms": float(agg["95%"]),
        "p99_ms": float(agg["99%"]),
        "predict_p95_ms": float(rows.get("/predict", agg)["95%"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("profile", choices=PROFILES)
    p.add_argument("--host", default="http://localhost:3000")
    p.add_argument("--p95-ms", type=float, default=2000.0)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "load")
    a = p.parse_args(argv)
    users, rate, duration = PROFILES[a.profile]
    out = a.out / a.profile
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "tests" / "load" / "locustfile.py"),
        "--headless", "-u", str(users), "-r", str(rate), "-t", duration, "--host", a.host,
        "--html", str(out / "report.html"), "--csv", str(out / "locust"), "--only-summary",
        "--p95-ms", str(a.p95_ms), "--loglevel", "WARNING",
    ]  # fmt: skip
    code = subprocess.run(cmd, cwd=ROOT).returncode
    summary = {
        "profile": a.profile,
        "users": users,
        "duration": duration,
        "exit_code": code,
        **summarise(out / "locust"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
