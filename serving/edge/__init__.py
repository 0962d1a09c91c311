"""The one HTTP edge every request passes: read, refused or answered once, for the hot routes
and BentoML's routes alike.

    front.py      the dispatch: key check, hot routes, BentoML behind the same admission rules
    guard.py      API keys (serving.auth) -> the request's Principal, or 401/403
    requests.py   headers, media types, bodies within their limits, multipart forms
    responses.py  JSON answers and error bodies, BentoML's 400s reworded
    errors.py     HttpError and the error messages (validation, overload)
    access.py     the access log
    protocol.py   the HTTP server's header size limit and header timeout (uvicorn)

Routes import what they need from here (`from serving.edge import HttpError, read_body, ...`).
"""

from serving.edge.access import AccessLog
from serving.edge.errors import (
    RETRY_AFTER,
    HttpError,
    describe_validation_errors,
    error_response,
    overloaded,
    validation_error,
)
from serving.edge.front import UNLOGGED_PATHS, Front, HotRoutes, RouteTable, dispatch
from serving.edge.guard import Guard, principal_of
from serving.edge.requests import header, media_type, read_body
from serving.edge.responses import JSON_HEADERS, send_error, send_json

__all__ = [
    "JSON_HEADERS",
    "RETRY_AFTER",
    "UNLOGGED_PATHS",
    "AccessLog",
    "Front",
    "Guard",
    "HotRoutes",
    "HttpError",
    "RouteTable",
    "describe_validation_errors",
    "dispatch",
    "error_response",
    "header",
    "media_type",
    "overloaded",
    "principal_of",
    "read_body",
    "send_error",
    "send_json",
    "validation_error",
]
