"""Hostile HTTP clients that tests and benchmarks both run: many connections whose request
headers never end (slowloris), and one header block of many MiB."""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SLOW_START = b"POST /predict HTTP/1.1\r\nHost: slow\r\n"


def raise_open_files_limit(needed: int) -> int:
    """Lift this process's soft limit on open files to `needed` (and the hard one, as root):
    thousands of connections need more than the usual 1,024, here and in a server started
    from here, which inherits the limit. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
        except (ValueError, OSError):  # not root: as far as the hard limit allows
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class SlowHeaders:
    """What happened to the connections of a slowloris attack."""

    connections: int
    opening_s: float  # to open them all
    lifetimes_s: list[float]  # from each connection's opening to the server closing it, sorted
    all_closed_s: float | None  # from the first opening to the last close (None: some never closed)
    answers: list[tuple[int, float]] = field(default_factory=list)  # the probe's (status, seconds)

    @property
    def closed(self) -> int:
        return len(self.lifetimes_s)

    def summary(self) -> str:
        life = self.lifetimes_s
        statuses = sorted({s for s, _ in self.answers})
        latencies = sorted(t for _, t in self.answers)
        probe = (
            f"; /predict meanwhile: {len(self.answers)} answers {statuses}, median "
            f"{latencies[len(latencies) // 2] * 1000:.0f} ms, slowest {latencies[-1] * 1000:.0f} ms"
            if latencies
            else ""
        )
        closing = (
            f"all closed {self.all_closed_s:.1f} s after the first opened" if self.all_closed_s else "NOT all closed"
        )
        return (
            f"{self.connections} slow-header connections opened in {self.opening_s:.2f} s; {self.closed} closed by "
            f"the server, {closing}; lifetime min {life[0]:.1f} / median {life[len(life) // 2]:.1f} / max "
            f"{life[-1]:.1f} s{probe}"
            if life
            else f"{self.connections} slow-header connections: none closed{probe}"
        )


def slow_headers(
    port: int,
    connections: int,
    give_up_s: float,
    probe: Callable[[], int] | None = None,
    trickle_s: float = 1.0,
) -> SlowHeaders:
    """Open `connections` to 127.0.0.1:`port`, each starting a request and then sending one
    more header byte every `trickle_s` for as long as the server keeps it open (so a server
    that only times out silent connections would keep them). Returns when the server has
    closed them all, or after `give_up_s`. `probe` (returning an HTTP status) is called in a
    loop meanwhile, timed."""
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    closed: dict[socket.socket, float] = {}
    started: set[socket.socket] = set()
    answers: list[tuple[int, float]] = []
    stop = threading.Event()

    def probing() -> None:
        while not stop.is_set():
            t = time.monotonic()
            answers.append((probe(), time.monotonic() - t))
            time.sleep(0.05)

    start = time.monotonic()
    try:
        for _ in range(connections):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            opened[sock] = time.monotonic()
            sel.register(sock, selectors.EVENT_WRITE)
        opening = time.monotonic() - start
        thread = threading.Thread(target=probing, daemon=True) if probe else None
        if thread:
            thread.start()
        last_trickle = time.monotonic()
        while len(closed) < connections and time.monotonic() - start < give_up_s:
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                if sock not in started:  # connected: start the request
                    with contextlib.suppress(OSError):
                        sock.send(SLOW_START)
                    started.add(sock)
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(4096)  # the server's 408 first, then the close
                except OSError:
                    data = b""
                if not data:
                    closed[sock] = time.monotonic()
                    sel.unregister(sock)
                    sock.close()
            if time.monotonic() - last_trickle >= trickle_s:
                last_trickle = time.monotonic()
                for sock in started - closed.keys():
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
    finally:
        stop.set()
        if probe and thread is not None:
            thread.join(60)
        for sock in opened:
            if sock not in closed:
                sock.close()
        sel.close()
    lifetimes = sorted(closed[s] - opened[s] for s in closed)
    all_closed = max(closed.values()) - start if len(closed) == connections else None
    return SlowHeaders(connections, opening, lifetimes, all_closed, answers)


@dataclass
class BigHeader:
    status_line: bytes  # b"" when the server closed without an answer
    sent_bytes: int
    seconds: float


def big_header(port: int, size: int = 16 * 1024 * 1024, path: bytes = b"/predict") -> BigHeader:
    """One request whose header block is `size` bytes: what the server answers, how much of
    it was taken in before it did, how long that took."""
    start = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: big\r\nX-Filler: ")
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while sent < size:
                sock.sendall(b"a" * 65536)
                sent += 65536
            sock.sendall(b"\r\n\r\n")
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while block := sock.recv(65536):
                answer += block
    return BigHeader(answer.split(b"\r\n", 1)[0], sent, time.monotonic() - start)
