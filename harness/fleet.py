"""A real fleet on this machine: redis-server, N `bentoml serve` replicas, haproxy in front.

    with Fleet(tmp_path, model_tag, replicas=2) as fleet:
        httpx.post(f"{fleet.url}/predict", ...)           # through the load balancer
        fleet.replicas[0].url                              # one replica directly
        fleet.kill(0); fleet.replace(0)                    # kill -9, then a new replica in its slot
        fleet.restart(0)                                   # drain, SIGTERM, new replica, back in

haproxy balances round-robin over fixed replica slots (one port each) with `GET /readyz`
health checks every 0.5 s, like a Kubernetes Service over ready pods; its admin socket takes
a slot out of rotation (`maint`) and back (`ready`), like endpoint removal before a pod's
SIGTERM. Redis keeps an append-only file, so a stopped and restarted server keeps its data.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import yaml

from harness.servers import ROOT, ServeProcess, free_port

BACKEND = "replicas"


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:  # `make test` installs them (Makefile: system-packages); a bare pytest may not
        raise RuntimeError(f"{binary} is not installed: run `make system-packages` (Debian: apt-get install {binary})")
    return path


class RedisServer:
    """redis-server on loopback with persistence (AOF) in `directory`.

    `password` protects the default user (requirepass; the URL carries it); `args` adds
    server options (an ACL file, TLS, `--enable-debug-command yes`); `url` overrides the URL
    clients are given (e.g. rediss://user:password@... for an ACL user over TLS); `username`
    and `password` are what the harness itself logs in with (an ACL user with every right)."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        password: str | None = None,
        args: tuple[str, ...] = (),
        url: str | None = None,
        username: str | None = None,
    ):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.username = username
        self.args = args
        auth = f":{password}@" if password and not username else ""
        self.url = url or f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> RedisServer:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started_at = self.log_path.stat().st_size
        tls = "--tls-port" in self.args
        self.proc = subprocess.Popen(
            [
                require("redis-server"),
                "--bind", "127.0.0.1",
                "--port", "0" if tls else str(self.port),
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--save", "",
                "--daemonize", "no",
                *(("--requirepass", self.password) if self.password and not self.username else ()),
                *self.args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        # Ready once it says so (works for TLS and password-protected servers alike).
        while b"Ready to accept connections" not in self.log_path.read_bytes()[started_at:]:
            assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(self.client(timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    def client(self, timeout: float = 10):
        """A synchronous redis-py client with the server's credentials (for tests to drive it)."""
        import redis

        return redis.Redis(
            host="127.0.0.1", port=self.port, username=self.username, password=self.password, socket_timeout=timeout
        )

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections open, nothing answered), as a wedged host does."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            self.proc.terminate()
            self.proc.wait(20)
            self._log.close()


class HAProxy:
    """Round-robin over fixed replica slots, health-checked on /readyz."""

    def __init__(self, directory: Path, replica_ports: list[int], port: int | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = directory / "haproxy.sock"
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(replica_ports))
        # retry-on: a request that met a closed connection (a replica just killed or exiting)
        # is sent to another replica, as a Kubernetes Service's proxy or a cloud LB does.
        (directory / "haproxy.cfg").write_text(f"""
global
    stats socket {self.socket} mode 600 level admin
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend fe
    bind 127.0.0.1:{self.port}
    default_backend {BACKEND}
backend {BACKEND}
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        self._log = open(self.directory / "haproxy.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [require("haproxy"), "-db", "-f", str(self.directory / "haproxy.cfg")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert self.proc.poll() is None, (self.directory / "haproxy.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "haproxy did not start"
            time.sleep(0.05)
        return self

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def set_state(self, slot: int, state: str) -> None:
        """`maint` (out of rotation) or `ready` (back in; health checks still decide)."""
        self.command(f"set server {BACKEND}/r{slot} state {state}")

    def up(self, slot: int) -> bool:
        for line in self.command("show stat").splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == BACKEND and fields[1] == f"r{slot}":
                return fields[17] == "UP"
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
            self._log.close()


class Fleet:
    """redis-server + `replicas` x `bentoml serve service:BankChurn` + haproxy."""

    def __init__(self, directory: Path, model_tag: str, replicas: int = 2, env: dict[str, str] | None = None):
        self.directory = directory
        self.redis = RedisServer(directory / "redis")
        self.env = {
            "BANKCHURN_MODEL_TAG": model_tag,
            "BANKCHURN_REDIS_URL": self.redis.url,
            "BANKCHURN_JOB_WORKERS": "1",
            **(env or {}),
        }
        self.ports = [free_port() for _ in range(replicas)]
        self.replicas: list[ServeProcess] = [ServeProcess(env=self.env, port=p) for p in self.ports]
        self.lb = HAProxy(directory, self.ports)
        self.url = self.lb.url

    def __enter__(self) -> Fleet:
        self.redis.start()
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            replica.wait_ready(180)
        self.lb.start()
        for slot in range(len(self.replicas)):
            self.wait_in_rotation(slot)
        return self

    def __exit__(self, *exc: object) -> None:
        self.lb.stop()
        for replica in self.replicas:
            replica.stop()
        self.redis.stop()

    def wait_in_rotation(self, slot: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.lb.up(slot):
            assert time.monotonic() < deadline, f"replica {slot} never came UP in haproxy"
            time.sleep(0.1)

    def worker_pids(self, slot: int) -> set[int]:
        """The replica's processes: the `bentoml serve` arbiter and its worker."""
        proc = self.replicas[slot].proc
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(proc.pid)
            return {root.pid, *(c.pid for c in root.children(recursive=True))}
        return set()

    def slot_of_pid(self, pid: int) -> int:
        for slot in range(len(self.replicas)):
            if pid in self.worker_pids(slot):
                return slot
        raise LookupError(f"no replica has process {pid}")

    def kill(self, slot: int) -> None:
        """kill -9 the whole replica (arbiter and worker): a pod lost with its node."""
        replica = self.replicas[slot]
        pids = self.worker_pids(slot)  # circus puts the worker in a process group of its own
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        replica.proc.wait(10)
        psutil.wait_procs([p for p in map(_process, pids) if p is not None], timeout=10)

    def replace(self, slot: int) -> ServeProcess:
        """A new replica in the slot (same port: haproxy's health check brings it back in)."""
        replica = ServeProcess(env=self.env, port=self.ports[slot]).start()
        self.replicas[slot] = replica
        replica.wait_ready(180)
        return replica

    def restart(self, slot: int) -> float:
        """A rolling-restart step: out of rotation, SIGTERM (graceful drain), a new replica,
        back in rotation. Returns the seconds the old replica took to exit."""
        self.lb.set_state(slot, "maint")
        time.sleep(1.0)  # requests already routed to it finish (a pod's preStop pause)
        started = time.monotonic()
        assert self.replicas[slot].stop(timeout=60) == 0, self.replicas[slot].log()[-3000:]
        exited = time.monotonic() - started
        self.replace(slot)
        self.lb.set_state(slot, "ready")
        self.wait_in_rotation(slot)
        return exited


def redis_secret() -> dict[str, str]:
    """What deploy/redis-secret.sh puts in the Secret bank-churn-redis, decoded."""
    out = subprocess.run([str(ROOT / "deploy" / "redis-secret.sh")], capture_output=True, text=True, check=True)
    return {k: base64.b64decode(v).decode() for k, v in yaml.safe_load(out.stdout)["data"].items()}


def manifest_redis(directory: Path, secret: dict[str, str], admin_password: str) -> RedisServer:
    """redis-server with the manifest's ACL users (the service's, KEDA's), plus an `admin` of
    the caller's own to drive it with (CONFIG SET, REPLICAOF, DEBUG SLEEP): the service and
    KEDA only ever see their users."""
    directory.mkdir(parents=True, exist_ok=True)
    acl = directory / "users.acl"
    acl.write_text(secret["users.acl"] + f"\nuser admin on >{admin_password} ~* &* +@all\n")
    return RedisServer(
        directory / "data",
        username="admin",
        password=admin_password,
        args=("--aclfile", str(acl), "--enable-debug-command", "yes", "--maxmemory-policy", "noeviction"),
    ).start()


def service_redis_url(secret: dict[str, str], port: int) -> str:
    """The Secret's BANKCHURN_REDIS_URL, pointed at a local server instead of the Service."""
    return secret["BANKCHURN_REDIS_URL"].replace("bank-churn-redis:6379", f"127.0.0.1:{port}")


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def wait_for_job(url: str, job_id: str, timeout: float = 300, until: tuple[str, ...] = ("completed",)) -> dict:
    """Poll GET /jobs/{id} until its status is one of `until` (fails on another final status)."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/jobs/{job_id}", timeout=10)
        if r.status_code == 200:
            status = r.json()
            if status["status"] in until:
                return status
            assert status["status"] not in ("completed", "failed", "cancelled"), status
        assert time.monotonic() < deadline, f"job {job_id} not {until} after {timeout}s: {r.status_code} {r.text}"
        time.sleep(0.1)
