"""Connections to the job store's Redis, and what its failures mean.

Two clients, because two kinds of call wait very differently:

- the *request* client answers the API (POST /jobs, status, results, cancel) and carries the
  job store's writes: a short socket timeout (BANKCHURN_REDIS_TIMEOUT_S), so a hung Redis (a
  stopped process, DEBUG SLEEP, a network partition) costs a request about that timeout before
  its 503, instead of holding it. A refused or reset connection is retried once (a restarted
  server leaves dead connections in the pool); a timeout is not (the server is hung: waiting
  again would only double the wait);
- the *worker* client carries saq's worker loop, whose dequeue is a blocking BLMOVE of up to
  DEQUEUE_TIMEOUT_S: its socket timeout must be longer than that.

A password comes in the URL (redis://:password@host:6379/0, or redis://user:password@... for
an ACL user). `rediss://` is TLS; the server's certificate is verified against
BANKCHURN_REDIS_CA_FILE (else the system's CAs), host name included.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

DEQUEUE_TIMEOUT_S = 5
WORKER_SOCKET_TIMEOUT_S = 15  # > DEQUEUE_TIMEOUT_S


def redis_client(url: str, timeout_s: float = 1.0, ca_file: Path | None = None, retries: int = 1) -> Any:
    """A redis.asyncio client for the job store (see the module docstring)."""
    import redis.asyncio
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

    options: dict[str, Any] = {}
    if url.startswith("rediss://"):
        options["ssl_cert_reqs"] = "required"
        if ca_file is not None:
            options["ssl_ca_certs"] = str(ca_file)
    return redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=min(timeout_s, 2.0),
        socket_timeout=timeout_s,
        socket_keepalive=True,
        health_check_interval=15,
        # One quick retry of a refused or reset connection rides out a restarted server's dead
        # pooled connections; redis-py's default (3 tries of timeouts too, backing off to 10 s)
        # would hold a request ~45 s before its 503.
        retry=Retry(
            ExponentialWithJitterBackoff(base=0.1, cap=0.5),
            retries=retries,
            supported_errors=(redis.exceptions.ConnectionError,),
        ),
        **options,
    )


def redis_clients(url: str, timeout_s: float, ca_file: Path | None) -> tuple[Any, Any]:
    """(request client, worker client) for one Redis URL."""
    return (
        redis_client(url, timeout_s, ca_file),
        redis_client(url, WORKER_SOCKET_TIMEOUT_S, ca_file, retries=0),
    )


def store_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when the store cannot serve it: unreachable, hung, full,
    read-only, still loading, refusing our credentials. Every Redis error counts: a store
    that answers an error is as unavailable as one that does not answer (503, not 500)."""
    import redis.exceptions

    return (redis.exceptions.RedisError, OSError)


def describe(exc: BaseException) -> str:
    """A short, password-free reason for a Redis failure (for 503 bodies, logs, metrics)."""
    import redis.exceptions as e

    kinds: tuple[tuple[type[BaseException], str], ...] = (
        (e.OutOfMemoryError, "full (out of memory)"),
        (e.ReadOnlyError, "read-only (a replica)"),
        (e.AuthenticationError, "refusing our credentials (check the password in BANKCHURN_REDIS_URL)"),
        (e.NoPermissionError, "refusing a command to our user (check its ACL)"),
        (e.BusyLoadingError, "still loading its data"),
        (e.TimeoutError, "not answering (timed out)"),
        (e.ConnectionError, "unreachable"),
        (OSError, "unreachable"),
    )
    if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
        return "not trusted (its TLS certificate does not verify against BANKCHURN_REDIS_CA_FILE or the system's CAs)"
    for kind, reason in kinds:
        if isinstance(exc, kind):
            return reason
    text = str(exc).split(" ", 1)[0]  # a Redis error reply's code: BUSY, MISCONF, MASTERDOWN, ...
    return f"failing ({text[:20]})" if text.isupper() else "failing"


async def close(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()
