"""What the service's processes log, made safe to keep and to read.

Three rules, applied by one filter on every log handler (BentoML's and ours), so that they
hold for every logger, ours or a library's:

- **No customer values.** A pydantic ValidationError's text quotes each bad field's
  `input_value` (for a missing field, the whole customer), and BentoML 1.4 logs one at ERROR,
  traceback and all, for every 400 its APIs answer (`_bentoml_impl/server/app.py`,
  `api_endpoint_wrapper` -> `log_exception`; no BentoML setting turns it off). A record
  carrying one, as its exception or as an argument, gets a one-line summary instead (where
  and which rule, never the value) at WARNING: a client's mistake is not the server's error.
- **No secrets.** Registered secret strings (the Redis URL's password) are masked wherever
  they appear, in the message or in a traceback.
- **One record, one line.** Control characters in a message are escaped: a request path with
  `%0d%0a` (decoded by the HTTP server) must not forge a log line.

`install()` puts the filter on the handlers configured when it runs: BentoML configures its
logging before it imports the service, in the `bentoml serve` arbiter and in each worker.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

# C0 and C1 controls but tab, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
MASK = "***"
# Shorter secrets are not masked: masking every "ab" would garble the log and hide nothing.
MIN_SECRET_CHARS = 4
_secrets: set[str] = set()


def escape_controls(text: str) -> str:
    """`text` on one line: each control character written as \\xNN (\\uNNNN beyond Latin-1)."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def register_secret(value: str | None) -> None:
    """Mask `value` (and its percent-decoded form, as URLs carry it) in every log record."""
    for form in {value or "", unquote(value or "")}:
        if len(form) >= MIN_SECRET_CHARS:
            _secrets.add(form)


def redact(text: str) -> str:
    """`text` with every registered secret masked."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _validation_error(exc: Any) -> Any:
    """The first pydantic ValidationError in an exception's chain, or None."""
    from pydantic_core import ValidationError

    for _ in range(8):
        if not isinstance(exc, BaseException):
            return None
        if isinstance(exc, ValidationError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe_invalid(exc: Any, limit: int = 5) -> str:
    """'2 validation errors (customer.Age: less_than_equal; customer.?: extra_forbidden)':
    locations and rule names only. A location is the schema's path, except an unknown
    field's name, which is the client's own text (it could be anything): shown as '?'."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    parts = []
    for err in errors[:limit]:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and err.get("type") == "extra_forbidden":
            loc[-1] = "?"
        parts.append(f"{escape_controls('.'.join(loc))[:120] or 'body'}: {err.get('type', 'invalid')}")
    more = f"; and {len(errors) - limit} more" if len(errors) > limit else ""
    count = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}"
    return f"{count} ({'; '.join(parts)}{more}); input values not logged"


class SafeLogFilter(logging.Filter):
    """The three rules above, on one record. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._sanitise(record)
        except Exception:  # a log line must never fail a request
            record.msg, record.args = "(a log record could not be made safe and was withheld)", ()
            record.exc_info = record.exc_text = None
        return True

    @staticmethod
    def _sanitise(record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple) and any(_validation_error(a) is a for a in record.args if a is not None):
            record.args = tuple(describe_invalid(a) if _validation_error(a) is a else a for a in record.args)
        message = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        invalid = _validation_error(exc)
        if invalid is not None:
            if invalid is exc:  # the traceback is the library's, the message quotes the values
                message = f"{message}: {describe_invalid(invalid)}"
                record.exc_info = record.exc_text = None
            else:  # keep the outer exception's traceback, without the chained validation error
                message = f"{message} (caused by {describe_invalid(invalid)})"
                record.exc_text = "".join(traceback.format_exception(exc, chain=False)).rstrip("\n")
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        message = escape_controls(message.rstrip("\n"))
        if _secrets:
            message = redact(message)
            if record.exc_info and not record.exc_text:
                record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
        if message is not record.msg:
            record.msg, record.args = message, ()


_FILTER = SafeLogFilter()


def install(secrets: Iterable[str] = ()) -> int:
    """Mask `secrets` from now on, and put the filter first on every handler of every
    configured logger (once each); returns how many handlers have it."""
    for secret in secrets:
        register_secret(secret)
    handlers = set(logging.root.handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers.update(logger.handlers)
    for handler in handlers:
        if _FILTER not in handler.filters:
            # first: BentoML's own filter formats the level into its line prefix
            handler.filters.insert(0, _FILTER)
    return len(handlers)
