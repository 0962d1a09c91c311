"""Health-probe loop in its own process, so the test's own work cannot delay the probes.

python -m tests.probe URL SECONDS   -> prints a JSON list of [path, seconds, status]
"""

from __future__ import annotations

import json
import sys
import time

import httpx


def main(url: str, seconds: float) -> None:
    out = []
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=10) as c:
        while time.monotonic() < deadline:
            for path in ("/livez", "/readyz"):
                t0 = time.perf_counter()
                status = c.get(f"{url}{path}").status_code
                out.append((path, time.perf_counter() - t0, status))
            time.sleep(0.02)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
