"""The access log of every route (BentoML's own is off: it costs a middleware pass per request)."""

from __future__ import annotations

import logging
import random

from starlette.types import Scope

from serving import telemetry
from serving.auth import PRINCIPAL_KEY
from serving.logs import escape_controls

access_logger = logging.getLogger("bentoml.access.bank_churn")
# A path longer than this is cut short in the log (the header limit bounds it anyway).
LOGGED_PATH_CHARS = 300


def logged_path(scope: Scope) -> str:
    """The path as logged: secrets removed (a route's `log_path`, e.g. a job id), on one line
    (a %0d%0a decoded by the server cannot forge a line), and short."""
    path = telemetry.loggable_path(scope)
    if len(path) > LOGGED_PATH_CHARS:
        path = path[:LOGGED_PATH_CHARS] + "..."
    return escape_controls(path)


class AccessLog:
    """'errors' (status >= 400, the default), 'all', 'off', or a sampling rate such as '0.01'
    (every error, plus that share of the rest). A line names the key's holder (`key=crm`),
    never the key; the query string is not logged."""

    def __init__(self, policy: str):
        self.policy = policy.strip().lower()
        self.rate = 0.0
        if self.policy not in ("errors", "all", "off"):
            self.rate = float(self.policy)  # validated by Settings
            self.policy = "sampled"

    def __call__(self, scope: Scope, status: int, seconds: float) -> None:
        if self.policy == "off":
            return
        if self.policy == "errors" and status < 400:
            return
        if self.policy == "sampled" and status < 400 and random.random() >= self.rate:
            return
        client = scope.get("client") or ("-", 0)
        level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
        principal = scope.get(PRINCIPAL_KEY)
        access_logger.log(
            level,
            "%s:%s (scheme=%s,method=%s,path=%s) (status=%d,latency=%.3fms%s)",
            client[0],
            client[1],
            scope.get("scheme", "http"),
            escape_controls(scope["method"]),
            logged_path(scope),
            status,
            seconds * 1000,
            f",key={principal.name}" if principal is not None else "",
        )
