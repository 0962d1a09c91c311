"""HTTP edges the service needs beyond BentoML's defaults: a request size limit and
error bodies that name the offending field and what it allows."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import telemetry
from models.schema import BY_NAME


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
            msg += f" (allowed fields: {', '.join(BY_NAME)})"
        out.append(f"{path}: {msg}")
    return out


class BodyLimitMiddleware:
    """Refuses request bodies larger than max_bytes with 413, before they are parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if too_big:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read up to the limit, then replay the body.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"request body larger than {self.max_bytes} bytes")(scope, receive, send)


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
