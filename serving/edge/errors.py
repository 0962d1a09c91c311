"""Error answers: one JSON shape, {"error": "<what is wrong and what is allowed>", ...extra},
whichever route refuses the request and for whatever reason."""

from __future__ import annotations

from typing import Any

import pydantic
from starlette.responses import JSONResponse

from models.schema import BY_NAME
from serving import telemetry
from serving.concurrency import Overloaded

RETRY_AFTER = {"Retry-After": "1"}
# Messages name at most this many problems; the rest are counted.
SHOWN_PROBLEMS = 10


class HttpError(Exception):
    """An error answer a handler raises: status, message, extra JSON fields, headers."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status = status_code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The same answer as a Starlette response, for what BentoML's APIs return."""
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


def join_problems(messages: list[str]) -> str:
    extra = len(messages) - SHOWN_PROBLEMS
    return "; ".join(messages[:SHOWN_PROBLEMS]) + (f" (and {extra} more)" if extra > 0 else "")


def validation_error(exc: pydantic.ValidationError) -> HttpError:
    """400 naming each bad field and what it allows, shaped like BentoML's validation answers."""
    detail = exc.errors(include_input=False, include_context=False)
    return HttpError(400, join_problems(describe_validation_errors(detail)), detail=detail)


def overloaded(exc: Overloaded) -> HttpError:
    """503 + Retry-After at once, counted, instead of letting the request time out."""
    telemetry.SHED.inc()
    return HttpError(503, f"overloaded: {exc}; retry later", headers=RETRY_AFTER)
