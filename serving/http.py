"""HTTP edges the service needs beyond BentoML's defaults: a request size limit and
error bodies that name the offending field and what it allows."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anyio
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.schema import BY_NAME
from serving import telemetry


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def describe_validation_errors(detail: list[dict[str, Any]]) -> list[str]:
    """'customer.Age: Input should be ... (allowed: an integer in [18, 100])' for each error."""
    out = []
    for err in detail:
        loc = [str(p) for p in err.get("loc", ())]
        path = ".".join(loc) or "body"
        msg = err.get("msg", "invalid value")
        feature = next((BY_NAME[p] for p in reversed(loc) if p in BY_NAME), None)
        if feature is not None and err.get("type") != "extra_forbidden":
            msg += f" (allowed: {feature.allowed()})"
        elif err.get("type") == "extra_forbidden":
            # a customer's fields sit under "customer" or "customers.<i>"; anything else is the body
            in_customer = len(loc) >= 2 and (loc[-2] == "customer" or loc[-2].isdigit())
            msg += f" (allowed fields: {', '.join(BY_NAME)})" if in_customer else " (not a field of this request)"
        out.append(f"{path}: {msg}")
    return out


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _header_problem(headers: Headers) -> tuple[int, str] | None:
    """Refuse what the APIs cannot read before reading the body: compressed bodies (nothing
    decodes them) and media types other than JSON and multipart (BentoML would parse a
    text/plain body as JSON, and a form-urlencoded one as a form whose text fields it fetches
    as URLs)."""
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        return 415, f"Content-Encoding {encoding[:50]!r} is not supported; send the body uncompressed"
    media = _media_type(headers)
    if media not in ("", "application/json", "multipart/form-data"):
        return 415, (
            f"Content-Type {media[:50]!r} is not supported; send application/json (CSV files go to POST /jobs)"
        )
    return None


async def _multipart_problem(headers: Headers, body: bytes) -> str | None:
    """Parse a multipart body with the parser BentoML uses. BentoML answers 500 to a
    malformed one, and treats a plain-text part sent for a file field as a URL to download
    (a server-side fetch); no API here takes a text field in a multipart body, so only file
    parts are accepted (CSV uploads go to POST /jobs, which is not behind this middleware)."""

    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream()).parse()
    except Exception as exc:  # whatever this parser cannot read, BentoML's cannot either (-> 500)
        return f"malformed multipart/form-data body: {getattr(exc, 'message', None) or exc}"
    try:
        fields = [name for name, value in form.multi_items() if not isinstance(value, UploadFile)]
    finally:
        await form.close()
    if fields:
        names = ", ".join(repr(name[:50]) for name in fields[:5])
        return f"multipart/form-data accepts file parts only (with a filename); plain field(s) {names} refused"
    return None


class BodyLimitMiddleware:
    """Admits a request only if the APIs can read it: a body of at most max_bytes (else 413)
    in a supported media type and encoding (else 415), and a well-formed multipart body (else
    400). The body is read here, counting the bytes that actually arrive (the Content-Length
    header alone is not trusted: with Transfer-Encoding: chunked the HTTP parser ignores it),
    and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        has_body = scope["method"] in _BODY_METHODS
        problem = _header_problem(headers) if has_body else None
        if problem is not None:
            await error_response(*problem)(scope, receive, send)
            return
        limit = self.max_bytes
        length = headers.get("content-length")
        if length is not None and "transfer-encoding" not in headers:
            try:
                too_big = int(length) > limit
            except ValueError:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if too_big:
                await self._refuse(limit, scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away before sending the whole body: there is no request to
                # run. (Left to BentoML, this is logged as a 500 with a traceback.)
                await error_response(400, "client disconnected before sending the whole body")(scope, receive, send)
                return
            size += len(message.get("body", b""))
            if size > limit:
                await self._refuse(limit, scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if has_body and _media_type(headers) == "multipart/form-data":
            # Parsed on a worker thread: an upload of many MiB would otherwise stall the loop.
            problem = await anyio.to_thread.run_sync(lambda: asyncio.run(_multipart_problem(headers, body)))
            if problem is not None:
                await error_response(400, problem)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"request body larger than {limit} bytes")(scope, receive, send)


class ValidationMessageMiddleware:
    """Rewrites BentoML's 400 validation bodies so the top-level message names each field.

    Only 400 responses are buffered; every other response streams through untouched. It is
    the outermost of our middlewares, so it also stamps the request's arrival time.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        telemetry.REQUEST_START.set(time.perf_counter())
        start: Message | None = None
        body = bytearray()

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if message["status"] != 400:
                    await send(message)
                    return
                start = message
                return
            if start is None:
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            payload = _reshape(bytes(body))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, receive, capture)


def _reshape(raw: bytes) -> bytes:
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoML wraps 4xx exception bodies in a one-element list
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        messages = describe_validation_errors(data["detail"])
        if messages:
            data["error"] = "; ".join(messages[:10]) + (
                f" (and {len(messages) - 10} more)" if len(messages) > 10 else ""
            )
    return json.dumps(data).encode()
