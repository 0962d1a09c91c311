"""Answers written straight to ASGI `send`: JSON bodies, error bodies, and BentoML's 400
bodies reworded so that their message names each field and what it allows."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.types import Send

from serving.edge.errors import HttpError, describe_validation_errors, join_problems

JSON_HEADERS = [(b"content-type", b"application/json")]


async def send_json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    """A whole JSON answer; `body` is serialised unless it already is bytes."""
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    raw = [*JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
    if headers:
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def send_error(send: Send, err: HttpError) -> None:
    await send_json(send, err.status, err.body(), err.headers)


def reword_validation_body(raw: bytes) -> bytes:
    """BentoML's 400 body with a top-level `error` naming every bad field ("customer.Age:
    Input should be ... (allowed: an integer in [18, 100])"), its `detail` kept."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoML wraps 4xx exception bodies in a one-element list
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        messages = describe_validation_errors(data["detail"])
        if messages:
            data["error"] = join_problems(messages)
    return json.dumps(data).encode()
