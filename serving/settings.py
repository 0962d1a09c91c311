"""Runtime settings: one object, read once from BANKCHURN_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.store import DEFAULT_MODEL_TAG

# Secrets as files (a Kubernetes Secret volume): a file named like the variable, e.g.
# /run/secrets/bank-churn/BANKCHURN_REDIS_URL for a managed Redis whose URL holds a password.
# Environment variables win over these files.
SECRETS_DIR = Path(os.environ.get("BANKCHURN_SECRETS_DIR", "/run/secrets/bank-churn"))
ENV_PREFIX = "BANKCHURN_"
# Marks a setting whose value may hold a secret: never shown in errors, logs or repr().
SECRET: dict[str, Any] = {"secret": True}


class SettingsError(ValueError):
    """Settings that cannot be used; the message names each variable and what it needs, and
    never shows a secret setting's value."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", secrets_dir=SECRETS_DIR if SECRETS_DIR.is_dir() else None
    )

    model_tag: str = Field(DEFAULT_MODEL_TAG, description="model-store tag to serve")
    use_compiled: bool = Field(True, description="serve the ONNX model when its parity check passed")
    inference_threads: int = Field(1, ge=1, le=64, description="threads running predictions")
    runtime_threads: int = Field(1, ge=1, le=64, description="intra-op threads of the compiled runtime")
    max_batch_rows: int = Field(10_000, ge=1, le=1_000_000, description="row limit of /predict_batch")
    micro_batch_rows: int = Field(256, ge=1, le=10_000, description="largest coalesced /predict batch")
    max_queue: int = Field(256, ge=1, description="queued predictions beyond which requests get 503")
    explain_threads: int = Field(1, ge=1, le=16, description="threads computing explanations (own pool)")
    max_explain_queue: int = Field(16, ge=1, description="queued explanations beyond which requests get 503")
    request_timeout_s: float = Field(10.0, gt=0, description="per-request timeout (504 after it)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request bodies above this get 413")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024 * 1024, description="request line and headers above this get 431"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a connection that has not sent a request's whole headers in this time is closed",
    )
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="CSV uploads above this get 413")
    max_csv_rows: int = Field(200_000, ge=1, description="row limit of a CSV scoring job")
    max_concurrent_uploads: int = Field(
        2, ge=1, le=64, description="CSV uploads received and checked at once per process; more get 503 + Retry-After"
    )
    predict_route: Literal["hot", "bentoml"] = Field(
        "hot",
        description="who answers POST /predict over HTTP: the hot route in front of BentoML's middleware, "
        "or BentoML's own API machinery (the same model and answers, ~4x the per-request cost)",
    )
    access_log: str = Field(
        "errors",
        pattern=r"^(errors|all|off|0(\.\d+)?|1(\.0+)?)$",
        description="access log of every route: errors (status >= 400), all, off, or a sampling rate such as 0.01",
    )
    grpc_port: int = Field(
        3001,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol over gRPC (inference.GRPCInferenceService, "
        "grpc.health.v1), served by the worker beside HTTP; 0 turns it off",
    )
    grpc_host: str = Field("0.0.0.0", description="address the gRPC server binds ([::] for IPv6 too)")
    otel_exporter: Literal["none", "console", "otlp"] = Field("none", description="where tracing spans go")
    api_keys_file: Path | None = Field(
        None,
        description="API keys (serving.auth): every route but the probes and /metrics needs one; "
        "unset = no authentication (a warning at start-up)",
    )

    # Scoring jobs (serving.jobs). Without a Redis URL the jobs live in this process only.
    redis_url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|unix)://",
        description="jobs queue and result store shared by every replica (redis://[[user]:password@]host:port/db; "
        "rediss:// for TLS); unset = an embedded store in this process (single replica only)",
        json_schema_extra=SECRET,  # redis://:password@host
    )
    redis_ca_file: Path | None = Field(
        None,
        description="CA certificate(s) (PEM) that a rediss:// server's certificate must chain to; "
        "unset = the system's CAs",
    )
    redis_timeout_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="longest wait for one Redis command of a request (one retry follows); "
        "a hung Redis costs a request about twice this before its 503",
    )
    job_workers: int = Field(1, ge=0, le=64, description="jobs this process runs at once (0: accept and answer only)")
    job_ttl_s: int = Field(24 * 3600, ge=60, description="how long a finished job's status and result are kept")
    job_chunk_rows: int = Field(5_000, ge=10, le=100_000, description="rows scored per checkpoint of a job")
    job_heartbeat_s: int = Field(
        10, ge=2, le=300, description="a running job unseen for this long is taken over by another worker"
    )
    job_attempts: int = Field(5, ge=1, le=100, description="tries of a job whose workers die before it fails")
    job_timeout_s: int = Field(3600, ge=10, description="longest a single try of a job may run")
    job_reconcile_s: int = Field(
        30,
        ge=1,
        le=3600,
        description="how often a job worker walks the live jobs for ones a Redis outage left without a "
        "queue entry (re-queued, or failed if never accepted); a job is looked at once untouched for twice this",
    )
    job_queue: str = Field("bank_churn", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="queue name in Redis")

    # The prediction log (serving.predictionlog): a record per scored row, for drift and
    # realized-performance reports (python -m monitoring.drift / monitoring.performance read
    # it back with these same settings).
    prediction_log_sink: Literal["file", "redis", "off"] = Field(
        "file",
        description="where scored rows are logged: JSON-lines files under prediction_log_dir (one process), "
        "a capped Redis stream shared by every replica, or nowhere",
    )
    prediction_log_sample: float = Field(1.0, ge=0, le=1, description="share of scored rows logged (0 = none)")
    prediction_log_dir: Path = Field(Path("prediction_log"), description="directory of the file sink")
    prediction_log_redis_url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|unix)://",
        description="Redis of the stream sink (unset: BANKCHURN_REDIS_URL, the jobs' Redis)",
        json_schema_extra=SECRET,
    )
    prediction_log_stream: str = Field(
        "bank_churn:predictions", pattern=r"^[A-Za-z0-9_.:-]{1,128}$", description="stream key of the Redis sink"
    )
    prediction_log_retention_hours: float = Field(
        24 * 35, gt=0, description="logged rows older than this are deleted (both sinks)"
    )
    prediction_log_max_rows: int = Field(
        1_000_000, ge=1000, description="Redis sink: the stream keeps at most about this many rows"
    )
    prediction_log_max_bytes: int = Field(
        2 * 1024**3, ge=1024**2, description="file sink: the directory keeps at most about this many bytes"
    )
    prediction_log_queue_rows: int = Field(
        100_000, ge=1, description="rows waiting to be written beyond which new rows are dropped (and counted)"
    )

    @property
    def prediction_log_redis(self) -> str | None:
        """The Redis URL of the stream sink: its own, else the jobs' Redis."""
        return self.prediction_log_redis_url or self.redis_url

    @model_validator(mode="after")
    def _redis_tls(self) -> Settings:
        # Checked here, so that `bentoml serve` stops at start-up with the reason (the URL is
        # never quoted: it may hold a password).
        if self.redis_ca_file is not None:
            if not (self.redis_url or "").startswith("rediss://"):
                raise ValueError("BANKCHURN_REDIS_CA_FILE is set but BANKCHURN_REDIS_URL is not a rediss:// (TLS) URL")
            if not self.redis_ca_file.is_file():
                raise ValueError(f"BANKCHURN_REDIS_CA_FILE={self.redis_ca_file}: no such file")
        return self

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            # pydantic's own message quotes every input (input_value=...), a Redis URL's
            # password included; this one names the variable and the rule.
            raise SettingsError(_describe(exc)) from None

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in secret_fields() and isinstance(value, str) else value

    def secret_values(self) -> list[str]:
        """What must never be shown: each secret setting's value and the password in it."""
        out = []
        for name in secret_fields():
            value = getattr(self, name, None)
            if isinstance(value, str) and value:
                out.append(value)
                password = _password(value)
                if password:
                    out.append(password)
        return out


def secret_fields() -> frozenset[str]:
    return frozenset(
        name for name, field in Settings.model_fields.items() if (field.json_schema_extra or {}).get("secret")
    )


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """redis://user:***@host:6379/0: a URL with its password (whatever precedes the last '@'
    of its authority, when the URL cannot be parsed) masked."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, sep, userinfo = head.partition("://")
    if not sep:
        return "***@" + tail
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}://{user}:***@{tail}"


def _describe(exc: ValidationError) -> str:
    hidden = secret_fields()
    lines = []
    for err in exc.errors(include_url=False, include_context=False):
        name = str(err["loc"][0]) if err.get("loc") else ""
        if not name:  # a rule across settings: its input is all of them, never shown
            lines.append(err["msg"].removeprefix("Value error, "))
            continue
        if name in hidden:
            shown = "(value not shown: it may hold a password)"
        else:
            shown = f"(got {str(err.get('input', ''))[:80]!r})"
        lines.append(f"{ENV_PREFIX}{name.upper()}: {err['msg']} {shown}")
    return "invalid settings: " + "; ".join(lines)
