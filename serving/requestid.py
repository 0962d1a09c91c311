"""Request ids: every request gets one, returned in the `X-Request-Id` response header (and,
for a gRPC ModelInfer call, in its `x-request-id` trailing metadata).

The client's `X-Request-Id` is kept when it is well-formed (1 to 128 printable ASCII
characters, no control characters, no leading or trailing space); anything else, or none,
is replaced by a new random id (32 hex digits, as nginx's $request_id). Nothing is refused
for it. The id of the request being handled is in a contextvar, so the engine reads it on
the event loop and on the pool threads (which run in a copy of the request's context), and
the prediction log joins a logged row to the request that asked for it.
"""

from __future__ import annotations

import contextvars
import os
import re

from starlette.types import Message, Scope, Send

HEADER = b"x-request-id"
GRPC_KEY = "x-request-id"  # gRPC metadata keys are lower-case
MAX_LENGTH = 128
_WELL_FORMED = re.compile(rb"[\x21-\x7e](?:[\x20-\x7e]{0,%d}[\x21-\x7e])?" % (MAX_LENGTH - 2))

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def new_id() -> str:
    return os.urandom(16).hex()


def _client_id(value: bytes | None) -> str:
    """The client's id when it is well-formed, else a new one."""
    return value.decode("ascii") if value is not None and _WELL_FORMED.fullmatch(value) else new_id()


def from_scope(scope: Scope) -> str:
    """An HTTP request's id, from its first X-Request-Id header."""
    return _client_id(next((value for key, value in scope["headers"] if key == HEADER), None))


def adopt(value: str | None) -> str:
    """Make a gRPC call's id (from its x-request-id metadata value) the id of the call being
    handled; return it."""
    request_id = _client_id(value.encode("ascii") if value is not None and value.isascii() else None)
    REQUEST_ID.set(request_id)
    return request_id


def current() -> str | None:
    """The id of the request being handled here (None outside a request, e.g. in a job)."""
    return REQUEST_ID.get()


def stamp(scope: Scope, send: Send) -> Send:
    """Give the request its id (contextvar and scope) and return a `send` that adds the
    X-Request-Id header to the response."""
    request_id = from_scope(scope)
    REQUEST_ID.set(request_id)
    scope["bank_churn.request_id"] = request_id
    header = (HEADER, request_id.encode("ascii"))

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return send_with_id
