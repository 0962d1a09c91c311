"""Score a CSV of customers with the jobs API: submit it, follow its progress, save the result.

    python examples/jobs.py customers.csv --url http://localhost:3000 --out scored.csv

The file needs the dataset's feature columns (CustomerId, if present, is carried through).
Ctrl-C cancels the job on the server. Any replica behind the load balancer answers for the
job when the service runs with BANKCHURN_REDIS_URL.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

FINAL = ("completed", "failed", "cancelled")


def score_file(url: str, path: Path, out: Path, poll_s: float = 0.5) -> dict:
    """Submit `path`, show a progress bar until the job ends, stream the result CSV to `out`."""
    with httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/jobs", files={"file": (path.name, path.read_bytes(), "text/csv")})
        if r.status_code != 202:
            raise SystemExit(f"refused ({r.status_code}): {r.json()['error']}")
        job_id, total = r.json()["job_id"], r.json()["rows_total"]
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        try:
            with Progress(*columns) as progress:
                bar = progress.add_task(f"job {job_id}", total=total)
                while (status := client.get(f"/jobs/{job_id}").json())["status"] not in FINAL:
                    progress.update(bar, completed=status["rows_done"])
                    time.sleep(poll_s)
                progress.update(bar, completed=status["rows_done"])
        except KeyboardInterrupt:
            client.delete(f"/jobs/{job_id}")
            raise SystemExit(f"job {job_id} cancelled") from None
        if status["status"] != "completed":
            raise SystemExit(f"job {job_id} {status['status']}: {status.get('error', '')}")
        with client.stream("GET", f"/jobs/{job_id}/result", params={"format": "csv"}) as result, open(out, "wb") as fh:
            result.raise_for_status()
            for part in result.iter_bytes():
                fh.write(part)
    print(
        f"job {job_id}: {status['rows_done'] - status['rows_failed']} rows scored, {status['rows_failed']} "
        f"reported as errors, by {status['model_version']} -> {out}"
    )
    return status


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--url", default="http://localhost:3000")
    parser.add_argument("--out", type=Path, default=Path("scored.csv"))
    args = parser.parse_args()
    score_file(args.url, args.csv, args.out)
    sys.exit(0)
