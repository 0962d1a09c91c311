"""Metrics (Prometheus, on BentoML's /metrics) and tracing (OpenTelemetry) for the service.

Counters and histograms use prometheus_client's default registry, which BentoML collects in
multiprocess mode. Live state (pool threads busy, queue depth, served model) is rendered at
scrape time by the service's `__metrics__` hook, so it is exact rather than last-written.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:  # imported by the `bentoml serve` arbiter too, which never sees an array
    import numpy as np

PREFIX = "bank_churn"

STAGE_SECONDS = Histogram(
    f"{PREFIX}_stage_duration_seconds",
    "Time spent per stage of a request",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
BATCH_ROWS = Histogram(
    f"{PREFIX}_batch_rows",
    "Rows per model call (coalesced /predict batches, /predict_batch and CSV jobs)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 10_000, 100_000),
)
PREDICTIONS = Counter(f"{PREFIX}_predictions_total", "Customers scored, by decision", ["will_churn"])
SHED = Counter(f"{PREFIX}_shed_requests_total", "Requests refused because the service was overloaded")
AUTH_FAILURES = Counter(
    f"{PREFIX}_auth_failures_total",
    "Requests refused by API-key checks, by reason: missing, unknown, scope",
    ["reason"],
)
HEADER_REFUSALS = Counter(
    f"{PREFIX}_http_header_refusals_total",
    "Connections closed before their request's headers were complete: too_large (431), timeout (408 or none)",
    ["reason"],
)
# The hot routes (serving.edge) bypass BentoML's own request metrics; these replace them, and
# count what the edge refuses before BentoML sees it (keys, limits).
HTTP_REQUESTS = Counter(
    f"{PREFIX}_http_requests_total",
    "Requests answered by the hot routes or refused by the edge",
    ["route", "method", "status"],
)
HTTP_IN_PROGRESS = Gauge(
    f"{PREFIX}_http_requests_in_progress",
    "Requests the hot routes are answering now",
    ["route", "method"],
    multiprocess_mode="livesum",
)
HTTP_SECONDS = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "Time from request arrival to the last byte of the answer, hot routes",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# The same for gRPC (serving.v2.grpc), a parallel series in the standard gRPC terms: the full
# method name and the status code name (OK, INVALID_ARGUMENT, UNAVAILABLE, ...).
GRPC_REQUESTS = Counter(
    f"{PREFIX}_grpc_requests_total", "gRPC calls answered, by method and status code", ["method", "code"]
)
GRPC_SECONDS = Histogram(
    f"{PREFIX}_grpc_request_duration_seconds",
    "Time from a gRPC call's arrival to its answer",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# Scoring jobs (serving.jobs). Counted by the process that did the work; fleet-wide queue
# depth is rendered at scrape time (jobs_queue_* gauges: the same value from every pod).
JOBS = Counter(f"{PREFIX}_jobs_total", "Scoring jobs by event: submitted, completed, failed, cancelled", ["event"])
JOB_ROWS = Counter(f"{PREFIX}_job_rows_total", "Rows of scoring jobs processed, by outcome", ["outcome"])
JOB_DURATION = Histogram(
    f"{PREFIX}_job_duration_seconds",
    "Scoring jobs, from submission to completion",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400),
)
JOB_RESUMES = Counter(
    f"{PREFIX}_job_resumes_total", "Jobs taken over after their worker died or stopped, resumed from a checkpoint"
)
JOB_STORE_ERRORS = Counter(
    f"{PREFIX}_job_store_errors_total", "Failed calls to the job store / queue (Redis unreachable)", ["op"]
)
_job_store = {"up": 1}

# The prediction log (serving.predictionlog): rows written to its sink, and rows dropped
# because the queue was full (the sink slow or down) or the sink failed to take them.
LOG_WRITTEN = Counter(f"{PREFIX}_prediction_log_written_rows_total", "Scored rows written to the prediction log")
LOG_DROPPED = Counter(
    f"{PREFIX}_prediction_log_dropped_rows_total",
    "Scored rows the prediction log dropped: queue_full (the sink is slow or down) or sink_error",
    ["reason"],
)

_model_info: dict[str, str] = {}
_watched: list[Any] = []
_log: list[Any] = []

# Set by the HTTP middleware when a request arrives: 'validate' = arrival -> API entry
# (body read, JSON parsing and schema validation all happen in BentoML before our code).
REQUEST_START: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_start", default=None)

_tracer: trace.Tracer = trace.NoOpTracer()


def configure_tracing(exporter: str | Any = "none") -> None:
    """Turn tracing on: 'none' (default), 'console', 'otlp' (OTEL_EXPORTER_OTLP_* env vars),
    or an exporter object (tests pass an in-memory exporter)."""
    global _tracer
    if exporter == "none":
        _tracer = trace.NoOpTracer()
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        processor = SimpleSpanProcessor(ConsoleSpanExporter())
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter())
    else:
        processor = SimpleSpanProcessor(exporter)
    service_name = os.environ.get("OTEL_SERVICE_NAME", "bank-churn")
    # ALWAYS_ON, not the default parent-based sampler: our spans nest under BentoML's request
    # span (same trace id as its access log), which is unsampled unless BentoML's own tracing
    # is configured, and would otherwise drop them.
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=ALWAYS_ON)
    provider.add_span_processor(processor)
    _tracer = provider.get_tracer(PREFIX)


@functools.cache
def _child(metric: Any, *labels: str) -> Any:
    """A labelled series, resolved once: `.labels()` costs more than the observation itself."""
    return metric.labels(*labels)


class stage:
    """Time a stage into the histogram and, when tracing is on, a span of the same name.
    A small class rather than a generator: it runs several times per request."""

    __slots__ = ("_attributes", "_name", "_span", "_start")

    def __init__(self, name: str, **attributes: Any):
        self._name = name
        self._attributes = attributes
        self._span: Any = None

    def __enter__(self) -> None:
        if not isinstance(_tracer, trace.NoOpTracer):
            self._span = _tracer.start_as_current_span(f"{PREFIX}.{self._name}", attributes=self._attributes)
            self._span.__enter__()
        self._start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        _child(STAGE_SECONDS, self._name).observe(time.perf_counter() - self._start)
        if self._span is not None:
            self._span.__exit__(*exc)


def record_request(route: str, method: str, status: int, seconds: float) -> None:
    _child(HTTP_REQUESTS, route, method, str(status)).inc()
    _child(HTTP_SECONDS, route).observe(seconds)


def count_header_refusal(reason: str) -> None:
    _child(HEADER_REFUSALS, reason).inc()


def record_grpc(method: str, code: str, seconds: float) -> None:
    _child(GRPC_REQUESTS, method, code).inc()
    _child(GRPC_SECONDS, method).observe(seconds)


class _HeaderGetter:
    """OpenTelemetry's getter over a {lower-case name: value} dict of request headers."""

    def get(self, carrier: dict, key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if value is not None else None

    def keys(self, carrier: dict) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


# A route whose path holds a secret (a job id) puts the path logs and traces may show here.
LOG_PATH_KEY = "bank_churn.log_path"


def loggable_path(scope: dict) -> str:
    return scope.get(LOG_PATH_KEY) or scope["path"]


@contextlib.contextmanager
def request_span(scope: dict, route: str) -> Iterator[Any]:
    """A server span for a hot-route request when tracing is on (None, at no cost, when off),
    continuing the caller's W3C trace context."""
    if isinstance(_tracer, trace.NoOpTracer):
        yield None
        return
    from opentelemetry.propagate import extract

    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    attributes = {"http.request.method": scope["method"], "url.path": loggable_path(scope), "http.route": route}
    with _tracer.start_as_current_span(
        f"{scope['method']} {route}",
        context=extract(headers, getter=_GETTER),
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
    ) as span:
        yield span


def set_span_status(span: Any, status: int) -> None:
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.Status(trace.StatusCode.ERROR))


def record_since_request_start(name: str) -> None:
    """Record the time from request arrival to now as stage `name` (span included)."""
    started = REQUEST_START.get()
    if started is None:
        return
    elapsed = time.perf_counter() - started
    _child(STAGE_SECONDS, name).observe(elapsed)
    if not isinstance(_tracer, trace.NoOpTracer):
        end_ns = time.time_ns()
        span = _tracer.start_span(f"{PREFIX}.{name}", start_time=end_ns - int(elapsed * 1e9))
        span.end(end_time=end_ns)


def record_decisions(decisions: np.ndarray) -> None:
    """Count scored customers by decision (the engine's `will_churn` for each)."""
    churn = int(decisions.sum())
    if churn:
        _child(PREDICTIONS, "true").inc(churn)
    if len(decisions) - churn:
        _child(PREDICTIONS, "false").inc(len(decisions) - churn)


def log_written(rows: int) -> None:
    LOG_WRITTEN.inc(rows)


def log_dropped(reason: str, rows: int) -> None:
    _child(LOG_DROPPED, reason).inc(rows)


def job_store_error(op: str) -> bool:
    """Count a failed call; True if the store was up until now (log an outage once)."""
    _child(JOB_STORE_ERRORS, op).inc()
    was_up, _job_store["up"] = _job_store["up"], 0
    return bool(was_up)


def job_store_ok() -> None:
    _job_store["up"] = 1


def job_metrics(backend: str, queued: int | None, active: int | None, running_here: int) -> str:
    """Prometheus text for the jobs' live state (queue depths are None when Redis is down)."""
    lines = [
        f"# HELP {PREFIX}_job_store_up Whether the last call to the job store ({backend}) succeeded",
        f"# TYPE {PREFIX}_job_store_up gauge",
        f'{PREFIX}_job_store_up{{backend="{backend}"}} {_job_store["up"]}',
        f"# HELP {PREFIX}_jobs_running_here Jobs this process is running now",
        f"# TYPE {PREFIX}_jobs_running_here gauge",
        f"{PREFIX}_jobs_running_here {running_here}",
    ]
    if queued is not None and active is not None:
        lines += [
            f"# HELP {PREFIX}_jobs_queue_queued Jobs waiting for a worker, whole fleet",
            f"# TYPE {PREFIX}_jobs_queue_queued gauge",
            f"{PREFIX}_jobs_queue_queued {queued}",
            f"# HELP {PREFIX}_jobs_queue_active Jobs held by a worker, whole fleet",
            f"# TYPE {PREFIX}_jobs_queue_active gauge",
            f"{PREFIX}_jobs_queue_active {active}",
        ]
    return "\n".join(lines) + "\n"


def set_model_info(tag: str, backend: str) -> None:
    _model_info.update(tag=tag, backend=backend)


def watch(batcher: Any, *pools: Any, log: Any = None) -> None:
    _watched[:] = [batcher, *pools]
    _log[:] = [log] if log is not None and log.enabled else []


def live_metrics() -> str:
    """Prometheus text for the process's live state, appended to BentoML's /metrics."""
    lines = []
    if _model_info:
        lines += [
            f"# HELP {PREFIX}_model_info The served model version and backend",
            f"# TYPE {PREFIX}_model_info gauge",
            f'{PREFIX}_model_info{{tag="{_model_info["tag"]}",backend="{_model_info["backend"]}"}} 1',
        ]
    if _watched:
        batcher, *pools = _watched
        for name, help_, attr in (
            ("pool_threads", "Threads in the pool", "threads"),
            ("pool_busy_threads", "Threads of the pool running a job now", "busy"),
            ("pool_queued_jobs", "Jobs waiting for a thread of the pool", "queued"),
        ):
            lines += [f"# HELP {PREFIX}_{name} {help_}", f"# TYPE {PREFIX}_{name} gauge"]
            lines += [f'{PREFIX}_{name}{{pool="{p.name}"}} {getattr(p, attr)}' for p in pools]
        lines += [
            f"# HELP {PREFIX}_batcher_pending_rows Single-row predictions waiting to join a batch",
            f"# TYPE {PREFIX}_batcher_pending_rows gauge",
            f"{PREFIX}_batcher_pending_rows {batcher.pending}",
        ]
    for log in _log:
        lines += [
            f"# HELP {PREFIX}_prediction_log_queued_rows Scored rows waiting to be written to the prediction log",
            f"# TYPE {PREFIX}_prediction_log_queued_rows gauge",
            f"{PREFIX}_prediction_log_queued_rows {max(0, log.queued_rows)}",
            f"# HELP {PREFIX}_prediction_log_sink_up Whether the last write to the prediction log's sink succeeded",
            f"# TYPE {PREFIX}_prediction_log_sink_up gauge",
            f"{PREFIX}_prediction_log_sink_up {log.sink_up}",
        ]
    return "\n".join(lines) + "\n"
