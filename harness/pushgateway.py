"""A real Prometheus Pushgateway (Debian's prometheus-pushgateway) on a free port."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx

from harness.fleet import require
from harness.servers import free_port


class Pushgateway:
    def __init__(self, directory: Path, port: int | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Pushgateway:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log = open(self.directory / "pushgateway.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [require("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, (self.directory / "pushgateway.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Pushgateway did not start"
            time.sleep(0.1)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
            self._log.close()
