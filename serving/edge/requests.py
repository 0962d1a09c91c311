"""Reading a request: headers, media types and the body, within the limits.

A body is read by counting the bytes that actually arrive (the Content-Length header alone is
not trusted: with Transfer-Encoding: chunked the HTTP parser ignores it), so nothing bigger
than the limit is ever held; compressed bodies are refused (nothing decodes them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser
from starlette.types import Receive, Scope

from serving.edge.errors import HttpError

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON = "application/json"
MULTIPART = "multipart/form-data"


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (`name` in lower case)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def media_type(scope: Scope) -> str:
    return (header(scope, b"content-type") or "").split(";")[0].strip().lower()


def check_encoding(scope: Scope) -> None:
    encoding = (header(scope, b"content-encoding") or "").strip().lower()
    if encoding not in ("", "identity"):
        raise HttpError(415, f"Content-Encoding {encoding[:50]!r} is not supported; send the body uncompressed")


def check_declared_length(scope: Scope, limit: int) -> None:
    """Refuse a body its Content-Length declares too big (413) before reading a byte of it."""
    length = header(scope, b"content-length")
    if length is not None and header(scope, b"transfer-encoding") is None:
        try:
            declared = int(length)
        except ValueError:
            raise HttpError(400, "invalid Content-Length header") from None
        if declared > limit:
            raise HttpError(413, f"request body larger than {limit} bytes")


async def body_chunks(scope: Scope, receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """The body as it arrives, refusing more than `limit` bytes (413) whatever the headers claim
    (a chunked body has no Content-Length), and a body the client stopped sending (400)."""
    check_declared_length(scope, limit)
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # No request to run. (Left to BentoML, this is logged as a 500 with a traceback.)
            raise HttpError(400, "client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body larger than {limit} bytes")
        yield chunk
        if not message.get("more_body", False):
            return


async def receive_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, within `limit` (see body_chunks)."""
    chunks = [chunk async for chunk in body_chunks(scope, receive, limit)]
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body: uncompressed (else 415), at most `limit` bytes (else 413)."""
    check_encoding(scope)
    return await receive_body(scope, receive, limit)


def check_api_media_type(scope: Scope) -> None:
    """BentoML's APIs read JSON and multipart bodies only: it would parse a text/plain body as
    JSON, and a form-urlencoded one as a form whose text fields it fetches as URLs."""
    media = media_type(scope)
    if media not in ("", JSON, MULTIPART):
        raise HttpError(
            415, f"Content-Type {media[:50]!r} is not supported; send application/json (CSV files go to POST /jobs)"
        )


async def _multipart_problem(headers: Headers, body: bytes) -> str | None:
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


async def check_api_multipart(scope: Scope, body: bytes) -> None:
    """A multipart body for a BentoML API, parsed with the parser BentoML uses (on a thread:
    an upload of many MiB would otherwise stall the loop). BentoML answers 500 to a malformed
    one, and treats a plain-text part sent for a file field as a URL to download (a
    server-side fetch); no API here takes a text field, so only file parts are accepted."""
    headers = Headers(scope=scope)
    problem = await anyio.to_thread.run_sync(lambda: asyncio.run(_multipart_problem(headers, body)))
    if problem is not None:
        raise HttpError(400, problem)
