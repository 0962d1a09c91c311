"""Receiving an upload: the request body streamed to a temporary file, in constant memory.

A CSV arrives as a `text/csv` body or as the file part of a `multipart/form-data` body
(`curl -F file=@customers.csv`). Either way its bytes go to an anonymous temporary file as
they arrive (a 1 MiB buffer per upload, never the whole body): a 64 MiB upload costs a
process 1 MiB of memory, and the file is gone when it is closed or the process dies. The
multipart body is parsed streaming by python-multipart (the parser Starlette uses), with
its per-part header limits; only one file part, named `file`, is kept.

At most BANKCHURN_MAX_CONCURRENT_UPLOADS uploads are received and checked at once per
process (UploadSlots); one more is answered 503 + Retry-After before its body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Iterator
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive, Scope

from serving.edge import HttpError, header, media_type
from serving.edge.requests import body_chunks, check_declared_length, check_encoding

FILE_FIELD = "file"
BUFFER_BYTES = 1 << 20
MAX_PARTS = 10
RETRY_AFTER_S = 5


class UploadSlots:
    """A per-process bound on uploads being received and checked (see the module docstring)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        """Hold a slot for the duration, or raise the 503 at once (nothing waits for a slot:
        a queue of 64 MiB uploads would hold their connections and their temporary files)."""
        if self.used >= self.limit:
            raise HttpError(
                503,
                f"{self.used} uploads are being received here already (BANKCHURN_MAX_CONCURRENT_UPLOADS="
                f"{self.limit}); retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


class _Sink:
    """Bytes to a temporary file through a bounded buffer."""

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(prefix="bank-churn-upload-")  # noqa: SIM115 - returned
        self._buffer = bytearray()

    def add(self, data: bytes | memoryview) -> None:
        self._buffer += data

    async def drain(self, force: bool = False) -> None:
        """Write the buffer out once it holds BUFFER_BYTES (or now, if `force`), off the loop."""
        if self._buffer and (force or len(self._buffer) >= BUFFER_BYTES):
            chunk, self._buffer = bytes(self._buffer), bytearray()
            await asyncio.to_thread(self.file.write, chunk)

    async def finish(self) -> IO[bytes]:
        await self.drain(force=True)
        await asyncio.to_thread(self.file.seek, 0)
        return self.file


def check_headers(scope: Scope, limit: int) -> str:
    """The upload's media type, after refusing what cannot be read: compressed bodies (415),
    other media types (415), a declared length over the limit (413, before reading)."""
    check_encoding(scope)
    media = media_type(scope)
    if media not in ("multipart/form-data", "text/csv"):
        raise HttpError(
            415,
            f"Content-Type {media[:50] or 'none'!r} is not supported here: send multipart/form-data with a "
            f"file part named {FILE_FIELD!r} (curl -F {FILE_FIELD}=@customers.csv) or a text/csv body",
        )
    check_declared_length(scope, limit)
    return media


async def receive_upload(scope: Scope, receive: Receive, limit: int) -> tuple[IO[bytes], str]:
    """The uploaded CSV in a temporary file (positioned at 0) and its file name. The caller
    closes the file. HttpError for a body that is too big, malformed or has no file part."""
    media = check_headers(scope, limit)
    sink = _Sink()
    try:
        if media == "text/csv":
            async for chunk in body_chunks(scope, receive, limit):
                sink.add(chunk)
                await sink.drain()
            return await sink.finish(), "upload.csv"
        parts = _FileParts(sink)
        parser = parts.parser(header(scope, b"content-type") or "")
        try:
            async for chunk in body_chunks(scope, receive, limit):
                parser.write(chunk)
                await sink.drain()
            parser.finalize()
        except FormParserError as exc:
            raise HttpError(400, f"malformed multipart/form-data body: {exc}") from None
        parts.check()
        return await sink.finish(), parts.filename or "upload.csv"
    except BaseException:
        sink.file.close()
        raise


class _FileParts:
    """python-multipart callbacks: the data of the one part named FILE_FIELD with a filename
    goes to the sink; other parts are counted and named in the error, their data dropped."""

    def __init__(self, sink: _Sink):
        self.sink = sink
        self.filename: str | None = None
        self.found = False
        self.names: list[str] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._into_file = False

    def parser(self, content_type: str) -> MultipartParser:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise HttpError(400, "malformed multipart/form-data body: no boundary in its Content-Type")
        try:
            return MultipartParser(
                boundary,
                {
                    "on_part_begin": self._begin,
                    "on_header_field": self._field,
                    "on_header_value": self._value,
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._headers_finished,
                    "on_part_data": self._data,
                    "on_part_end": self._end,
                },
            )
        except FormParserError as exc:
            raise HttpError(400, f"malformed multipart/form-data body: {exc}") from None

    def _begin(self) -> None:
        self._disposition = b""
        self._into_file = False
        if len(self.names) >= MAX_PARTS:
            raise HttpError(400, f"multipart/form-data body with more than {MAX_PARTS} parts")

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]  # python-multipart bounds a header's size

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self.names.append(name)
        if name == FILE_FIELD and b"filename" in options:
            if self.found:
                raise HttpError(400, f"one file per upload: the body has more than one part named {FILE_FIELD!r}")
            self.found = True
            self._into_file = True
            self.filename = options[b"filename"].decode("utf-8", "replace")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._into_file:
            self.sink.add(memoryview(data)[start:end])

    def _end(self) -> None:
        self._into_file = False

    def check(self) -> None:
        if not self.found:
            names = ", ".join(repr(n[:40]) for n in self.names) or "none"
            raise HttpError(
                400,
                f"multipart/form-data needs a file part named {FILE_FIELD!r} with a filename "
                f"(curl -F {FILE_FIELD}=@customers.csv); parts sent: {names}",
            )
