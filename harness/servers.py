"""A real `bentoml serve` of this repo's service in a subprocess, free ports, and reading /metrics:
what the tests and the benchmarks both start."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent  # the repository


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """A sample's value from Prometheus text exposition (sum over unmatched labels).

    A labelled series exists only once observed: pass default=0 when absence means zero."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                found = True
    if not found:
        if default is not None:
            return default
        raise KeyError(f"{name}{labels or ''} not in /metrics")
    return total


class ServeProcess:
    """A real `bentoml serve` of this repo's service, in its own process group."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        port: int | None = None,
        target: str = "service:BankChurn",
        prefix: tuple[str, ...] = (),
        root: Path = ROOT,
    ):
        self.target = target
        self.root = root  # the checkout to serve (a benchmark may serve an older one beside ours)
        self.prefix = prefix  # e.g. ("taskset", "-c", "0") to pin the server to one core
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
        # the service's gRPC port (BANKCHURN_GRPC_PORT): a free one too, unless the caller gives one
        if "BANKCHURN_GRPC_PORT" not in (env or {}):
            self.env["BANKCHURN_GRPC_PORT"] = str(free_port())
        self.env.setdefault("BANKCHURN_GRPC_HOST", "127.0.0.1")
        self.grpc_port = int(self.env["BANKCHURN_GRPC_PORT"])
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # bentoml serve makes its own
        self.proc: subprocess.Popen | None = None
        home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
        self.log_path = home / f"serve-{self.port}.log"
        if "BENTOML_HOME" not in (env or {}):
            # Each server gets a home of its own sharing the model store: `bentoml serve` wipes
            # $BENTOML_HOME/prometheus_multiproc_dir (and its task database) when it starts,
            # which would reset the metrics of every other server on the same home (as two
            # pods never share one).
            own = home / "servers" / str(self.port)
            own.mkdir(parents=True, exist_ok=True)
            if not (own / "models").exists():
                (own / "models").symlink_to(home / "models", target_is_directory=True)
            self.env["BENTOML_HOME"] = str(own)

    def start(self) -> ServeProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                self.target,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=self.root,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> float:
        """Seconds until /readyz answered 200; fails with the server log otherwise."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"bentoml serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready after {timeout}s:\n{self.log()[-3000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        import psutil

        # circus runs the worker in a process group of its own: remember the whole tree
        tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for process in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            self.proc.wait(10)
        psutil.wait_procs(tree, timeout=10)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def serving(**kwargs) -> Iterator[ServeProcess]:
    """A ready `bentoml serve` (ServeProcess arguments), stopped on exit."""
    proc = ServeProcess(**kwargs).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
