"""Hot routes: the request paths that carry the traffic, served in front of BentoML's stack.

BentoML wraps every request in its own ASGI middleware (OpenTelemetry spans, a timeout timer,
the access log, Prometheus multiprocess metrics) before a user middleware sees it; profiled,
that machinery, not the model, bounds a pod's request rate. The routes mounted here (POST
/predict, the Open Inference Protocol under /v2, the jobs API under /jobs) are answered by
plain ASGI handlers placed in front of that stack, with what operators need done cheaply
here instead: Prometheus metrics per route, tracing spans when tracing is on, a request
timeout, an access log (errors only by default), and the same body limits and media-type
rules as every other route. Every other path (the BentoML APIs, /docs.json, /metrics,
/livez, /readyz) goes through BentoML unchanged.

How it gets in front: the table is registered with `add_asgi_middleware`, which BentoML
places innermost; when the ASGI lifespan starts (before the server accepts a connection),
it re-inserts itself in front of the Starlette app's built middleware stack. If that is not
possible (a BentoML that builds its app differently) the routes still work, from the inner
position, and the log says so.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import requestid, telemetry

logger = logging.getLogger("bentoml.service.bank_churn.routes")
access_logger = logging.getLogger("bentoml.access.bank_churn")

JSON_HEADERS = [(b"content-type", b"application/json")]


class HttpError(Exception):
    """An error answer a hot handler raises: status, message, extra JSON fields, headers."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status = status_code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


async def send_json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    raw = [*JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def send_error(send: Send, err: HttpError) -> None:
    await send_json(send, err.status, {"error": err.message, **err.extra}, err.headers)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def media_type(scope: Scope) -> str:
    return (header(scope, b"content-type") or "").split(";")[0].strip().lower()


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than `limit` bytes (413) whatever the headers
    claim (chunked bodies have no Content-Length), and compressed bodies (415)."""
    encoding = (header(scope, b"content-encoding") or "").strip().lower()
    if encoding not in ("", "identity"):
        raise HttpError(415, f"Content-Encoding {encoding[:50]!r} is not supported; send the body uncompressed")
    length = header(scope, b"content-length")
    if length is not None and header(scope, b"transfer-encoding") is None:
        try:
            declared = int(length)
        except ValueError:
            raise HttpError(400, "invalid Content-Length header") from None
        if declared > limit:
            raise HttpError(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise HttpError(400, "client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class AccessLog:
    """The access log of every route: 'errors' (status >= 400, the default), 'all', 'off', or a
    sampling rate such as '0.01' (every error, plus that share of the rest)."""

    def __init__(self, policy: str):
        self.policy = policy.strip().lower()
        self.rate = 0.0
        if self.policy not in ("errors", "all", "off"):
            self.rate = float(self.policy)  # validated by Settings
            self.policy = "sampled"

    def __call__(self, scope: Scope, status: int, seconds: float) -> None:
        if self.policy == "off":
            return
        if self.policy == "errors" and status < 400:
            return
        if self.policy == "sampled" and status < 400 and random.random() >= self.rate:
            return
        client = scope.get("client") or ("-", 0)
        level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
        access_logger.log(
            level,
            "%s:%s (scheme=%s,method=%s,path=%s) (status=%d,latency=%.3fms)",
            client[0],
            client[1],
            scope.get("scheme", "http"),
            scope["method"],
            telemetry.loggable_path(scope),
            status,
            seconds * 1000,
        )


class RouteTable:
    """The hot routes of one process: exact (method, path) handlers and path-prefix apps."""

    def __init__(self) -> None:
        self.exact: dict[tuple[str, str], tuple[str, ASGIApp]] = {}
        self.prefixes: list[tuple[str, ASGIApp]] = []
        self.timeout_s: float = 60.0
        self.access_log = AccessLog("errors")

    def configure(self, timeout_s: float, access_log: str) -> None:
        self.timeout_s = timeout_s
        self.access_log = AccessLog(access_log)

    def route(self, method: str, path: str, app: ASGIApp) -> None:
        """Serve `method path` with `app`; if `app.accepts(scope)` exists and says no (e.g. a
        media type the hot handler leaves to BentoML), the request goes to BentoML instead."""
        self.exact[(method, path)] = (path, app)

    def mount(self, prefix: str, app: ASGIApp) -> None:
        """Serve `prefix` and everything under it with `app`, an ASGI app that answers 404/405
        itself. Optional attributes of `app`: `openapi_paths()` (merged into /docs.json),
        `route_label(scope)` (a low-cardinality label for metrics, e.g. '/jobs/{job_id}') and
        `log_path(path)` (the path as the access log and traces show it, secrets removed). Mounting
        a prefix again replaces its app (each service instance mounts its own; tests make several)."""
        prefix = prefix.rstrip("/")
        self.prefixes = [(p, a) for p, a in self.prefixes if p != prefix] + [(prefix, app)]

    def match(self, scope: Scope) -> tuple[str, ASGIApp] | None:
        path = scope["path"]
        hit = self.exact.get((scope["method"], path))
        if hit is not None:
            accepts = getattr(hit[1], "accepts", None)
            return hit if accepts is None or accepts(scope) else None
        for prefix, app in self.prefixes:
            if path == prefix or path.startswith(prefix + "/"):
                label = getattr(app, "route_label", None)
                return (label(scope) if label else prefix), app
        return None

    def openapi_paths(self) -> dict[str, Any]:
        paths: dict[str, Any] = {}
        for _, app in [*self.exact.values(), *self.prefixes]:
            describe = getattr(app, "openapi_paths", None)
            if describe is not None:
                paths.update(describe())
        return paths

    async def serve(self, label: str, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run a hot handler with metrics, an optional tracing span, the timeout and the access log."""
        start = time.perf_counter()
        telemetry.REQUEST_START.set(start)
        status = 500
        started = False
        timeout_s = getattr(app, "timeout_s", self.timeout_s)  # e.g. uploads take longer
        log_path = getattr(app, "log_path", None)  # e.g. /jobs/{job_id}: the id is a secret
        if log_path is not None:
            scope[telemetry.LOG_PATH_KEY] = log_path(scope["path"])

        async def tracked_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        in_progress = telemetry.HTTP_IN_PROGRESS.labels(label, scope["method"])
        in_progress.inc()
        with telemetry.request_span(scope, label) as span:
            try:
                async with asyncio.timeout(timeout_s):
                    await app(scope, receive, tracked_send)
            except HttpError as err:
                if not started:
                    await send_error(tracked_send, err)
            except TimeoutError:
                if not started:
                    await send_error(
                        tracked_send, HttpError(504, f"Not able to process the request in {timeout_s:g} seconds")
                    )
            except Exception:
                logger.exception("%s %s failed", scope["method"], telemetry.loggable_path(scope))
                if not started:
                    await send_error(tracked_send, HttpError(500, "internal error; see the server log"))
            finally:
                telemetry.set_span_status(span, status)
                in_progress.dec()
        seconds = time.perf_counter() - start
        telemetry.record_request(label, scope["method"], status, seconds)
        self.access_log(scope, status, seconds)


# Probes and scrapes are not logged, whatever the policy (as BentoML's access log skips them).
UNLOGGED_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


async def dispatch(app: ASGIApp, table: RouteTable, scope: Scope, receive: Receive, send: Send) -> None:
    """A hot route if one matches; /docs.json with the hot routes added; else BentoML's app.
    Every request gets an id (X-Request-Id); every one but probes goes through the one
    access log (BentoML's own is off)."""
    if scope["type"] != "http":
        await app(scope, receive, send)
        return
    send = requestid.stamp(scope, send)
    hit = table.match(scope)
    if hit is not None:
        await table.serve(hit[0], hit[1], scope, receive, send)
        return
    if scope["path"] in UNLOGGED_PATHS:
        await app(scope, receive, send)
        return
    start = time.perf_counter()
    status = 500

    async def tracked_send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    try:
        if scope["path"] == "/docs.json" and scope["method"] == "GET":
            await _with_openapi(app, table, scope, receive, tracked_send)
        else:
            await app(scope, receive, tracked_send)
    finally:
        table.access_log(scope, status, time.perf_counter() - start)


class _Front:
    """The table in front of the whole Starlette app (BentoML's stack behind it)."""

    def __init__(self, app: ASGIApp, table: RouteTable):
        self.app = app
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await dispatch(self.app, self.table, scope, receive, send)


class HotRoutes:
    """The middleware BentoML registers; moves the table in front at lifespan start-up."""

    def __init__(self, app: ASGIApp, table: RouteTable):
        self.app = app
        self.table = table
        self.promoted = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and not self.promoted:
            self._promote(scope.get("app"))
        if self.promoted:  # the front copy has routed this request already
            await self.app(scope, receive, send)
        else:
            await dispatch(self.app, self.table, scope, receive, send)

    def _promote(self, starlette: Any) -> None:
        stack = getattr(starlette, "middleware_stack", None)
        if stack is None:
            logger.warning("hot routes stay behind BentoML's middleware: no built Starlette stack to wrap")
            return
        starlette.middleware_stack = _Front(stack, self.table)
        self.promoted = True
        logger.info("hot routes served in front of BentoML's middleware")


async def _with_openapi(app: ASGIApp, table: RouteTable, scope: Scope, receive: Receive, send: Send) -> None:
    """BentoML's /docs.json plus the hot routes' own OpenAPI paths."""
    start: Message | None = None
    body = bytearray()

    async def capture(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        else:
            body.extend(message.get("body", b""))

    await app(scope, receive, capture)
    assert start is not None
    if start["status"] != 200:
        await send(start)
        await send({"type": "http.response.body", "body": bytes(body)})
        return
    spec = orjson.loads(bytes(body))
    spec.setdefault("paths", {}).update(table.openapi_paths())
    await send_json(send, 200, spec)
