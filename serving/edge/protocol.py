"""The HTTP server's side of the edge: a request's headers are bounded in size and in time.

BentoML's worker runs uvicorn with `http="auto"`, which is httptools here; uvicorn's httptools
protocol has no header limit (httptools grows a header by concatenation, so a 16 MiB header
costs quadratic time on the event loop) and no header timeout (a connection that never ends
its headers is held for ever, and a new one that sends nothing at all too). This subclass adds
both, at the byte level, before anything is parsed:

- at most `max_header_bytes` of request line and headers: the bytes are counted as they
  arrive, and the parser is never fed more than the limit while a request's headers are
  still open; past it the answer is 431 and the connection is closed. (A head that begins in
  the same read as the end of the request before it is counted from the next read: such a
  pipelined head is refused by twice the limit at most; no head is refused below it.)
- at most `header_timeout_s` from a new connection, or from the first byte of the next
  request on a kept-alive one, to the end of the headers; then 408 (if a byte arrived) and
  the connection is closed. Idle keep-alive between requests stays uvicorn's
  `timeout_keep_alive`.

A refusal waits for the answers to requests read before it on the same connection
(pipelining), so that answers stay in order; nothing more is parsed meanwhile.

The timer is armed only for a connection whose headers did not all arrive in one read, and no
parser callback is overridden, so a request that arrives whole (nearly all of them) costs a
few attribute checks.

`install()` makes it uvicorn's "auto" protocol. The worker builds its `uvicorn.Config` after
it has imported service.py, which calls install(), so the worker serves with it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving import telemetry

logger = logging.getLogger("bentoml.service.bank_churn.edge")

DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_HEADER_TIMEOUT_S = 10.0
# What this module relies on in uvicorn's class; checked by install().
_HOOKS = ("connection_made", "connection_lost", "data_received", "on_response_complete", "_unset_keepalive_if_required")


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit and a header timeout.

    Only the socket's events are overridden, none of the parser's callbacks: where a request
    stands is read from uvicorn's own state. `self.cycle` is the last request whose headers
    ended (uvicorn makes one when they do); while its body is still coming (`more_body`), the
    bytes arriving are body, else they are the next request's head."""

    max_header_bytes = DEFAULT_MAX_HEADER_BYTES
    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_of: Any = None  # the request the counted head follows (None: the connection's start)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int | None, str] | None = None  # (status or None: just close, message)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # being refused: nothing more is parsed
        cycle = self.cycle
        if cycle is None or not cycle.more_body:  # these bytes begin or continue a request's head
            if cycle is not self._head_of:  # the head after a request that has ended
                self._head_of, self._head_bytes = cycle, 0
            while len(data) > self.max_header_bytes - self._head_bytes:
                # Feed only what the limit allows: if the headers do not end within it, the
                # rest is never parsed.
                room = self.max_header_bytes - self._head_bytes
                super().data_received(data[:room])
                data = data[room:]
                if self._refusal is not None or self.transport.is_closing():
                    return
                cycle = self.cycle
                if cycle is self._head_of:  # no headers ended in it: one head took it all
                    self._refuse(
                        431, "too_large", f"request line and headers larger than {self.max_header_bytes} bytes"
                    )
                    return
                if cycle.more_body:  # the headers ended: the rest is that request's body
                    break
                # A request ended in it and the next one began: that one's share of the bytes
                # is not counted (a head is never refused below the limit, by twice it at most).
                self._head_of, self._head_bytes = cycle, 0
            else:
                self._head_bytes += len(data)
        super().data_received(data)
        cycle = self.cycle
        if cycle is not self._head_of:  # a request's headers ended in this read
            self._stop_head_timer()
            if cycle.more_body or self.scope is cycle.scope:
                return
            # ... and it ended too, and the next one began (uvicorn gave it a new scope): that
            # head is open from here.
            self._head_of, self._head_bytes = cycle, 0
        if self._head_timer is None and self._head_began() and not self.transport.is_closing():
            # The next request on a kept-alive connection has begun but its headers have not ended.
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _head_began(self) -> bool:
        """Whether the open head has a byte yet (counted, or parsed in the read that ended the
        request before it)."""
        return self._head_bytes > 0 or (self.cycle is not None and self.scope is not self.cycle.scope)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        head_open = self.cycle is self._head_of and (self.cycle is None or not self.cycle.more_body)
        if head_open and self._refusal is None and not self.transport.is_closing():
            # A connection that never sent a byte gets no answer, as an idle keep-alive one.
            status = 408 if self._head_began() else None
            self._refuse(status, "timeout", f"request headers not complete within {self.header_timeout_s:g} seconds")

    def _answering(self) -> bool:
        """Whether requests read before this one are still being answered (pipelining)."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _refuse(self, status: int | None, reason: str, message: str) -> None:
        telemetry.count_header_refusal(reason)
        self._refusal = (status, message)
        self._stop_head_timer()
        if not self._answering():
            self._send_refusal()
            return
        # Answered once the requests before it are, in order: each of them calls this back
        # when its answer is complete.
        for cycle in (self.cycle, *(queued for queued, _ in self.pipeline)):
            cycle.on_response = self._answered_one

    def _answered_one(self) -> None:
        self.on_response_complete()  # uvicorn's own: starts the next pipelined request, if any
        if not self._answering():
            self._send_refusal()

    def _send_refusal(self) -> None:
        status, message = self._refusal
        self._unset_keepalive_if_required()
        if status is not None and not self.transport.is_closing():
            body = b'{"error": "' + message.encode() + b'"}'
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
        self.transport.close()


def install(
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
) -> bool:
    """Make BoundedHttpToolsProtocol uvicorn's "auto" and "httptools" protocol, with these
    limits. False (and a warning) if uvicorn's class no longer has what it overrides."""
    import uvicorn.config

    missing = [name for name in _HOOKS if not callable(getattr(HttpToolsProtocol, name, None))]
    if missing:
        logger.warning("request-header limits are off: uvicorn's HttpToolsProtocol has no %s", ", ".join(missing))
        return False
    BoundedHttpToolsProtocol.max_header_bytes = max_header_bytes
    BoundedHttpToolsProtocol.header_timeout_s = header_timeout_s
    target = f"{__name__}:{BoundedHttpToolsProtocol.__name__}"
    uvicorn.config.HTTP_PROTOCOLS["auto"] = target
    uvicorn.config.HTTP_PROTOCOLS["httptools"] = target
    return True
