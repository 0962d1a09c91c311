"""The front: where every request is admitted or refused, then answered by a hot route or
passed to BentoML.

BentoML wraps every request in its own ASGI middleware (OpenTelemetry spans, a timeout timer,
the access log, Prometheus multiprocess metrics) before a user middleware sees it; profiled,
that machinery, not the model, bounds a pod's request rate. So the front sits before it, and
every request passes the same steps, once:

1. its id (serving.requestid: the X-Request-Id header, every request, probes included);
2. the key check (Guard): 401/403 before anything else runs (the probes and the scrape go
   straight to BentoML from here);
3. a hot route (POST /predict, POST /predict_batch, /v2, /jobs), answered here by a plain
   ASGI handler with what operators need done cheaply: Prometheus metrics per route, a
   tracing span when tracing is on, the request timeout;
4. else BentoML's stack, after the same admission rules a hot handler applies (media type,
   encoding, body size, multipart form), its 400 bodies reworded to name each field, and
   /docs.json completed with the hot routes;
5. the one access log (errors only by default; BentoML's own is off).

How it gets in front: the table is registered with `add_asgi_middleware`, which BentoML
places innermost; when the ASGI lifespan starts (before the server accepts a connection),
it re-inserts itself in front of the Starlette app's built middleware stack. If that is not
possible (a BentoML that builds its app differently) every step still runs, from the inner
position, and the log says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import requestid, telemetry
from serving.auth import OPEN, PRINCIPAL_KEY, KeyRing, required_scope
from serving.edge.access import AccessLog
from serving.edge.errors import HttpError
from serving.edge.guard import Guard
from serving.edge.requests import (
    BODY_METHODS,
    MULTIPART,
    check_api_media_type,
    check_api_multipart,
    check_encoding,
    media_type,
    receive_body,
)
from serving.edge.responses import reword_validation_body, send_error, send_json

logger = logging.getLogger("bentoml.service.bank_churn.routes")

# Probes and scrapes go straight to BentoML: open, not logged whatever the policy (as
# BentoML's access log skips them), and never refused by a limit.
UNLOGGED_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# The route label of a request to no known route, refused at the edge (metrics stay bounded).
OTHER_ROUTE = "other"
# How the OpenAPI document declares the key (when authentication is on).
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an API key: Authorization: Bearer <key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


class RouteTable:
    """The edge of one process: the key ring, the body limit of BentoML's routes, the access
    log, and the hot routes (exact (method, path) handlers and path-prefix apps)."""

    def __init__(self, keyring: KeyRing | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.exact: dict[tuple[str, str], tuple[str, ASGIApp]] = {}
        self.prefixes: list[tuple[str, ASGIApp]] = []
        self.timeout_s: float = 60.0
        self.access_log = AccessLog("errors")
        self.guard = Guard(keyring)
        self.max_body_bytes = max_body_bytes
        self.bentoml_paths: frozenset[str] = frozenset()  # BentoML's own routes, for metric labels

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

    async def serve(
        self, label: str, app: ASGIApp, scope: Scope, receive: Receive, send: Send, start: float | None = None
    ) -> None:
        """Run a hot handler with metrics, an optional tracing span, the timeout and the access log."""
        start = time.perf_counter() if start is None else start
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

    async def refuse(self, err: HttpError, scope: Scope, send: Send, start: float) -> None:
        """Answer a request the edge itself refuses (key, limits), counted under its route (its
        hot route's label, BentoML's route, or OTHER_ROUTE: the labels stay few) and logged as
        its route logs it."""
        await send_error(send, err)
        seconds = time.perf_counter() - start
        hit = self.match(scope)
        if hit is not None:
            label = hit[0]
            log_path = getattr(hit[1], "log_path", None)
            if log_path is not None:
                scope[telemetry.LOG_PATH_KEY] = log_path(scope["path"])
        else:
            label = scope["path"] if scope["path"] in self.bentoml_paths else OTHER_ROUTE
        telemetry.record_request(label, scope["method"], err.status, seconds)
        self.access_log(scope, err.status, seconds)

    async def admit_to_bentoml(self, scope: Scope, receive: Receive) -> bytes:
        """The body of a request for BentoML's routes, once it meets the rules a hot handler
        applies: a media type the APIs read and no compression (415), at most max_body_bytes
        (413), a whole body (400), a well-formed multipart form of files only (400)."""
        has_body = scope["method"] in BODY_METHODS
        if has_body:
            check_encoding(scope)
            check_api_media_type(scope)
        body = await receive_body(scope, receive, self.max_body_bytes)
        if has_body and media_type(scope) == MULTIPART:
            await check_api_multipart(scope, body)
        return body


async def dispatch(app: ASGIApp, table: RouteTable, scope: Scope, receive: Receive, send: Send) -> None:
    """Every request of the process gets an id (X-Request-Id); probes go straight to BentoML;
    the rest are admitted by the key check, then a hot route, or BentoML's app behind the same
    admission rules."""
    if scope["type"] != "http":
        await app(scope, receive, send)
        return
    send = requestid.stamp(scope, send)
    start = time.perf_counter()
    telemetry.REQUEST_START.set(start)
    if scope["path"] in UNLOGGED_PATHS:
        await app(scope, receive, send)
        return
    try:
        principal = table.guard.admit(scope)
    except HttpError as err:
        await table.refuse(err, scope, send, start)
        return
    if table.guard.enabled or PRINCIPAL_KEY not in scope:
        # Without keys, a principal already on the scope (an in-process caller's) is kept.
        scope[PRINCIPAL_KEY] = principal
    hit = table.match(scope)
    if hit is not None:
        await table.serve(hit[0], hit[1], scope, receive, send, start)
        return
    try:
        body = await table.admit_to_bentoml(scope, receive)
    except HttpError as err:
        await table.refuse(err, scope, send, start)
        return
    await _through_bentoml(app, table, scope, _replay(body, receive), send, start)


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _through_bentoml(
    app: ASGIApp, table: RouteTable, scope: Scope, receive: Receive, send: Send, start: float
) -> None:
    """BentoML's answer, its 400 bodies reworded (only those are buffered), logged."""
    status = 500
    held: Message | None = None
    body = bytearray()

    async def reworded_send(message: Message) -> None:
        nonlocal status, held
        if message["type"] == "http.response.start":
            status = message["status"]
            if status == 400:
                held = message
                return
        elif held is not None:
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            payload = reword_validation_body(bytes(body))
            headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        await send(message)

    try:
        if scope["path"] == "/docs.json" and scope["method"] == "GET":
            await _with_openapi(app, table, scope, receive, reworded_send)
        else:
            await app(scope, receive, reworded_send)
    finally:
        table.access_log(scope, status, time.perf_counter() - start)


class Front:
    """The edge in front of the whole Starlette app (BentoML's stack behind it)."""

    def __init__(self, app: ASGIApp, table: RouteTable):
        self.app = app
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await dispatch(self.app, self.table, scope, receive, send)


class HotRoutes:
    """The middleware BentoML registers; moves the edge in front at lifespan start-up."""

    def __init__(self, app: ASGIApp, table: RouteTable):
        self.app = app
        self.table = table
        self.promoted = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and not self.promoted:
            self._promote(scope.get("app"))
        if self.promoted:  # the front copy has admitted and routed this request already
            await self.app(scope, receive, send)
        else:
            await dispatch(self.app, self.table, scope, receive, send)

    def _promote(self, starlette: Any) -> None:
        stack = getattr(starlette, "middleware_stack", None)
        if stack is None:
            logger.warning("hot routes stay behind BentoML's middleware: no built Starlette stack to wrap")
            return
        self.table.bentoml_paths = frozenset(
            path for path in (getattr(r, "path", None) for r in getattr(starlette, "routes", ())) if path
        )
        starlette.middleware_stack = Front(stack, self.table)
        self.promoted = True
        logger.info("hot routes served in front of BentoML's middleware")


async def _with_openapi(app: ASGIApp, table: RouteTable, scope: Scope, receive: Receive, send: Send) -> None:
    """BentoML's /docs.json plus the hot routes' own OpenAPI paths, and how to present a key."""
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
    if table.guard.enabled:
        spec.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        spec["security"] = [{name: []} for name in SECURITY_SCHEMES]
        for path, operations in spec["paths"].items():
            if required_scope(path) == OPEN and isinstance(operations, dict):
                for operation in operations.values():
                    if isinstance(operation, dict):
                        operation["security"] = []
    await send_json(send, 200, spec)
