"""API keys: who may call what.

With BANKCHURN_API_KEYS_FILE set, every route but the probes and /metrics needs a key, sent as
`Authorization: Bearer <key>` (what `bentoml.SyncHTTPClient(url, token=...)`, curl and
tritonclient's `headers=` send) or `X-API-Key: <key>`. The file holds one key per line,

    name:scope[,scope...]:sha256hex      # e.g. crm:predict,jobs:5e88489...

the SHA-256 of the key in hex, never the key itself; `#` starts a comment, blank lines are
ignored. `python -m serving.keys new --name crm --scopes predict,jobs` mints a key and prints
its line. The file is read again when it changes (checked every RELOAD_CHECK_S on use), so a
line added to or removed from a mounted Kubernetes Secret takes effect without a restart; a
file that stops parsing keeps the last good keys and is reported in the log.

Scopes: `predict` (the online APIs, the Open Inference Protocol's inference and metadata, the
model card), `jobs` (create scoring jobs and use one's own), `admin` (any job: read, cancel,
erase). Nothing is implied by another scope but `admin`, which includes `jobs`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from serving import telemetry

logger = logging.getLogger("bentoml.service.bank_churn.auth")

KEYS_FILE_ENV = "BANKCHURN_API_KEYS_FILE"
PREDICT, JOBS, ADMIN = "predict", "jobs", "admin"
SCOPES = (PREDICT, JOBS, ADMIN)
# What the policy asks of a route besides a scope: nothing at all, or any valid key.
OPEN = "open"
AUTHENTICATED = "authenticated"
RELOAD_CHECK_S = 5.0
# The ASGI scope key that carries an authenticated request's Principal (None when auth is off).
PRINCIPAL_KEY = "bank_churn.principal"
REALM = "bank-churn"

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")
_BEARER = "bearer "


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the key's name (never the key) and its scopes."""

    name: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes or (scope == JOBS and ADMIN in self.scopes)


class AuthError(Exception):
    """A refused request: `status` 401 (no or unknown key) or 403 (a key without the scope);
    `reason` labels the failure metric (missing, unknown, scope); `principal` is the key's
    holder when the key was valid (403), for the access log."""

    def __init__(self, status: int, reason: str, message: str, principal: Principal | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.principal = principal

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 401:
            error = "" if self.reason == "missing" else ', error="invalid_token"'
            return {"WWW-Authenticate": f'Bearer realm="{REALM}"{error}'}
        return {}


class KeyFileError(ValueError):
    """The keys file cannot be used; the message names the line and what is wrong with it."""


def digest(key: str) -> str:
    """The SHA-256 of a key, in hex: what the keys file stores."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, source: str = "the keys file") -> dict[str, Principal]:
    """{sha256 hex: Principal} from a keys file's text; KeyFileError naming the first bad line.
    Messages never quote a line whole (a key pasted by mistake must not reach the log)."""
    keys: dict[str, Principal] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(":")
        if len(parts) != 3:
            raise KeyFileError(
                f"{source}, line {number}: expected name:scope[,scope...]:sha256hex (3 fields), found {len(parts)}"
            )
        name, scopes_text, hexdigest = (p.strip() for p in parts)
        if not _NAME.match(name):
            raise KeyFileError(f"{source}, line {number}: the name must be 1-64 of A-Z a-z 0-9 _ . -")
        scopes = frozenset(s.strip() for s in scopes_text.split(",") if s.strip())
        unknown = sorted(scopes - set(SCOPES))
        if not scopes or unknown:
            raise KeyFileError(
                f"{source}, line {number} ({name}): unknown or no scope {unknown or ''} (scopes: {', '.join(SCOPES)})"
            )
        if not _DIGEST.match(hexdigest):
            raise KeyFileError(
                f"{source}, line {number} ({name}): the third field must be the key's SHA-256 in hex "
                f"(64 characters), not the key (python -m serving.keys hash)"
            )
        if name in names:
            raise KeyFileError(f"{source}, line {number}: the name {name!r} is used twice")
        if hexdigest.lower() in keys:
            raise KeyFileError(f"{source}, line {number} ({name}): the same key is listed twice")
        names.add(name)
        keys[hexdigest.lower()] = Principal(name, scopes)
    return keys


def credential(authorization: str | None, api_key: str | None) -> str | None:
    """The key a request presents: `Authorization: Bearer <key>`, else `X-API-Key: <key>`."""
    if authorization is not None and authorization[: len(_BEARER)].lower() == _BEARER:
        return authorization[len(_BEARER) :].strip() or None
    if api_key is not None:
        return api_key.strip() or None
    return None


class KeyRing:
    """The keys of BANKCHURN_API_KEYS_FILE, re-read when the file changes."""

    def __init__(self, path: Path, reload_check_s: float = RELOAD_CHECK_S):
        self.path = Path(path)
        self.reload_check_s = reload_check_s
        self._lock = threading.Lock()
        self._keys: dict[bytes, Principal] = {}  # SHA-256 digest of a key -> its holder
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._load(initial=True)

    def __len__(self) -> int:
        return len(self._keys)

    def _file_stamp(self) -> tuple[int, int, int]:
        # A Kubernetes Secret volume swaps a symlink (..data): stat follows it, so the inode and
        # mtime change when the Secret does.
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self, initial: bool = False) -> None:
        try:
            stamp = self._file_stamp()
            text = self.path.read_text()
        except OSError as exc:
            if initial:
                raise KeyFileError(f"{KEYS_FILE_ENV}={self.path}: cannot read it ({exc.strerror})") from None
            logger.error("API keys file %s unreadable (%s); keeping the %d keys loaded", self.path, exc, len(self))
            return
        try:
            keys = parse_keys(text, f"{KEYS_FILE_ENV}={self.path}")
        except KeyFileError as exc:
            if initial:
                raise
            logger.error("API keys file changed but is invalid (%s); keeping the %d keys loaded", exc, len(self))
            self._stamp = stamp  # report once per bad version of the file
            return
        if not keys and initial:
            raise KeyFileError(f"{KEYS_FILE_ENV}={self.path} holds no key: every request would be refused")
        self._keys = {bytes.fromhex(h): p for h, p in keys.items()}
        if not initial:
            logger.warning("API keys reloaded from %s: %d keys (%s)", self.path, len(keys), _names(self._keys))
        self._stamp = stamp

    def refresh(self, now: float | None = None) -> None:
        """Re-read the file if it changed; at most once per reload_check_s."""
        now = time.monotonic() if now is None else now
        if now - self._checked < self.reload_check_s:
            return
        with self._lock:
            if now - self._checked < self.reload_check_s:
                return
            self._checked = now
            try:
                changed = self._file_stamp() != self._stamp
            except OSError:
                changed = True
            if changed:
                self._load()

    def authenticate(self, key: str | None) -> Principal:
        """The principal of a presented key. Its SHA-256 is compared with every stored digest,
        each comparison in constant time and none cut short, so the time taken says nothing
        about which key matched or how much of one. (~0.13 us a stored key: 20 keys cost ~1% of
        a /predict's CPU.) Presented keys are never kept."""
        if key is None:
            raise AuthError(401, "missing", "this API needs a key: Authorization: Bearer <key> or X-API-Key: <key>")
        self.refresh()
        presented = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for stored, principal in self._keys.items():
            if hmac.compare_digest(stored, presented) and found is None:
                found = principal
        if found is None:
            raise AuthError(401, "unknown", "unknown API key")
        return found

    def check(self, key: str | None, scope: str) -> Principal:
        """authenticate(key), then the scope: AuthError 401 or 403, counted by reason in
        bank_churn_auth_failures_total (never with the key). `scope` may be AUTHENTICATED."""
        try:
            principal = self.authenticate(key)
            if scope != AUTHENTICATED and not principal.may(scope):
                raise AuthError(
                    403, "scope", f"the key '{principal.name}' lacks the '{scope}' scope this API needs", principal
                )
        except AuthError as exc:
            telemetry.AUTH_FAILURES.labels(exc.reason).inc()
            raise
        return principal


def _names(keys: dict[bytes, Principal]) -> str:
    return ", ".join(sorted(p.name for p in keys.values())) or "none"


def load_keyring(path: str | os.PathLike | None) -> KeyRing | None:
    """The key ring of BANKCHURN_API_KEYS_FILE, or None (auth off) when it is unset.
    A set path that is missing, unreadable or invalid is a KeyFileError: the service must not
    start open because a Secret failed to mount."""
    if not path:
        return None
    return KeyRing(Path(path))


# ------------------------------------------------------------------ the policy: route -> scope

# Probes and the scrape stay open: Kubernetes' kubelet and Prometheus present no key, and the
# Ingress does not route /metrics (deploy/).
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready"})
PREDICT_PATHS = frozenset({"/predict", "/predict_batch", "/explain", "/model_card"})


def required_scope(path: str) -> str:
    """What a request to `path` needs: OPEN, AUTHENTICATED (any valid key: the OpenAPI documents
    and unknown paths, so that an unauthenticated client learns nothing of what exists), or a
    scope."""
    if path in OPEN_PATHS:
        return OPEN
    if path in PREDICT_PATHS or path == "/v2" or path.startswith("/v2/"):
        return PREDICT
    if path == "/jobs" or path.startswith("/jobs/"):
        return JOBS
    return AUTHENTICATED
