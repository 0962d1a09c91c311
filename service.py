"""BankChurn: the churn stacking ensemble served with BentoML.

All APIs are `async def` and only validate, await the inference pool and shape the
response; the blocking work lives in `models/` and runs on a small, bounded thread pool,
so the event loop (and with it /livez and /readyz) stays responsive under any load.

    bentoml serve            # http://localhost:3000, docs at /
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import bentoml
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from models.schema import BatchValidationError, Customer, row_values, schema_dict
from models.store import check_model, get_stored
from serving import logs, telemetry
from serving.auth import KEYS_FILE_ENV, load_keyring
from serving.concurrency import Overloaded
from serving.edge import HotRoutes, RouteTable, describe_validation_errors, error_response, overloaded, protocol
from serving.engine import EXPLAIN, PREDICT, PREDICT_BATCH, Engine
from serving.online import PredictRoute
from serving.settings import Settings

logger = logging.getLogger("bentoml.service.bank_churn")
settings = Settings()
# Log lines never carry a customer's values or a secret (serving.logs).
logs.install(secrets=settings.secret_values())
# The model and the API keys are resolved and checked when this module is imported, on
# purpose: the `bentoml serve` arbiter imports it too, so a missing, corrupt or mismatched
# model, or a keys file that is set but missing or invalid, stops start-up at once with a
# clear message. (Failing later, in a worker, makes the arbiter respawn the worker forever.)
# The check reads files but loads nothing: only the worker loads the model, in __init__.
# ':latest' is pinned to one version here.
STORED_MODEL = get_stored(settings.model_tag)
check_model(STORED_MODEL)
KEYRING = load_keyring(settings.api_keys_file)
# The one HTTP edge (serving.edge): every request passes its key check, then a hot route
# (filled in __init__: each worker process has one service instance) or BentoML's routes.
HOT_ROUTES = RouteTable(KEYRING, settings.max_body_bytes)
# Request headers bounded in size and time by the worker's HTTP server.
protocol.install(settings.max_header_bytes, settings.header_timeout_s)


class Contribution(BaseModel):
    feature: str
    value: Any
    contribution: float = Field(description="change in churn log-odds due to this feature's value")


class Explanation(BaseModel):
    base_value: float = Field(description="mean log-odds over the background customers")
    log_odds: float = Field(description="base_value + sum of contributions")
    churn_probability: float
    contributions: list[Contribution] = Field(description="sorted by absolute contribution, largest first")
    method: str


class Prediction(BaseModel):
    churn_probability: float = Field(ge=0, le=1)
    will_churn: bool = Field(description="churn_probability >= threshold")
    threshold: float
    model_version: str
    explanation: Explanation | None = None


class BatchPrediction(BaseModel):
    predictions: list[Prediction]


# Request bodies: unknown top-level fields are refused (a typo such as "explian" must not be
# silently ignored) and `explain` must be a JSON boolean. Validation errors never quote the
# customer's values (BentoML logs them; serving.logs is the net for every other model).
class PredictInput(bentoml.IODescriptor):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    customer: Customer  # type: ignore[valid-type]
    explain: bool = Field(False, strict=True, description="add per-feature contributions")


class BatchInput(bentoml.IODescriptor):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    # Rows arrive as plain objects and are validated against the same Customer schema on the
    # inference pool: validating 1,000 rows takes ~7 ms, which on the event loop would stall
    # health checks behind every large batch (measured: 1.1 s probes).
    customers: list[dict] = Field(
        min_length=1,
        max_length=settings.max_batch_rows,
        json_schema_extra={"items": Customer.model_json_schema()},  # documented as Customer rows
    )


class ExplainInput(bentoml.IODescriptor):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    customer: Customer  # type: ignore[valid-type]


class NoInput(bentoml.IODescriptor):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


@bentoml.service(
    # One worker per process: the pod, not the process, is the unit of scale (an HPA adds pods);
    # N workers in one pod share its CPU limit and thrash.
    workers=1,
    traffic={"timeout": settings.request_timeout_s},
    envs=[{"name": "OMP_NUM_THREADS", "value": "1"}],
    labels={"owner": "ml-platform", "project": "bank-churn"},
    # One access log for every route, written by serving.edge with BANKCHURN_ACCESS_LOG's
    # policy (errors only by default): BentoML's own costs a middleware pass per request.
    logging={"access": {"enabled": False}},
)
class BankChurn:
    # A class attribute makes the model a dependency of the service: `bentoml build` packs it.
    model_ref = bentoml.models.BentoModel(STORED_MODEL.tag)

    def __init__(self) -> None:
        self.ready = False
        telemetry.configure_tracing(settings.otel_exporter)
        # Imported here, in the worker: the arbiter imports this module only to check the model
        # (above), and NumPy would add ~170 modules and ~0.3 s to the start of every pod.
        from models.predictor import load_predictor
        from serving.jobs.manager import JobManager
        from serving.jobs.routes import JobRoutes
        from serving.predict_batch import PredictBatchRoute
        from serving.v2.rest import OpenInferenceApp

        self.predictor = load_predictor(STORED_MODEL, settings.use_compiled, settings.runtime_threads)
        self.engine = Engine(self.predictor, settings)
        self.tag = self.engine.tag
        HOT_ROUTES.configure(settings.request_timeout_s, settings.access_log)
        if settings.predict_route == "hot":
            HOT_ROUTES.route("POST", "/predict", PredictRoute(self.engine, PredictInput, settings.max_body_bytes))
            HOT_ROUTES.route(
                "POST",
                "/predict_batch",
                PredictBatchRoute(self.engine, BatchInput, settings.max_body_bytes, settings.max_batch_rows),
            )
        # The Open Inference Protocol (KServe V2); its health and readiness follow self.ready.
        v2 = OpenInferenceApp(self.engine, lambda: self.ready, settings.max_body_bytes, settings.max_batch_rows)
        HOT_ROUTES.mount("/v2", v2)
        # The same protocol over gRPC on BANKCHURN_GRPC_PORT, started on this worker's loop (below).
        self.grpc = None
        if settings.grpc_port:
            from serving.v2.grpc import GrpcServer, InferenceServicer

            servicer = InferenceServicer(
                self.engine,
                lambda: self.ready,
                settings.max_batch_rows,
                settings.request_timeout_s,
                v2.server_version,
                KEYRING,  # the same keys as the HTTP edge
            )
            self.grpc = GrpcServer(
                servicer, settings.grpc_host, settings.grpc_port, settings.max_body_bytes, 2 * settings.max_queue
            )
        # Scoring jobs: in Redis when BANKCHURN_REDIS_URL is set (any replica answers for any
        # job), else in this process; run by BANKCHURN_JOB_WORKERS workers here.
        self.jobs = JobManager(self.engine, settings)
        HOT_ROUTES.mount("/jobs", JobRoutes(self.jobs, settings.max_upload_bytes, settings.max_concurrent_uploads))
        # load_predictor() proved the model with a real prediction, so readiness can turn true
        # as soon as the pools exist.
        # Move everything loaded so far (frameworks, model) out of the cyclic GC's reach:
        # full collections over it held the GIL for 100-200 ms, stalling the event loop.
        gc.collect()
        gc.freeze()
        self.ready = True
        logger.info("serving %s with %s (%s)", self.tag, self.predictor.backend, self.predictor.backend_reason)
        if KEYRING is None:
            logger.warning(
                "authentication is OFF: %s is not set, so every API answers anyone who reaches this port", KEYS_FILE_ENV
            )
        else:
            logger.info("authentication on: %d API keys from %s", len(KEYRING), KEYRING.path)

    # Async hooks run on the event loop; sync ones are sent to a worker thread first, which
    # under load made /readyz wait for CPU and the GIL (stress p95: 250 ms vs 9 ms for /livez).
    async def __is_ready__(self) -> bool:
        return self.ready

    async def __metrics__(self, content: str) -> str:
        # BentoML's /metrics hook: append the live pool/queue gauges of this process and the jobs'.
        return content + telemetry.live_metrics() + await self.jobs.metrics_text()

    @bentoml.on_startup
    async def _start_jobs(self) -> None:
        await self.jobs.start()  # the job workers run on this worker's event loop

    @bentoml.on_startup
    async def _start_grpc(self) -> None:
        if self.grpc is not None:
            await self.grpc.start()

    @bentoml.on_shutdown
    async def _shutdown(self) -> None:
        self.ready = False
        if self.grpc is not None:  # calls in flight get the request timeout to finish
            await self.grpc.stop(settings.request_timeout_s)
        await self.jobs.stop()  # a running job goes back to the queue, resumed by another worker
        self.engine.shutdown()

    # ------------------------------------------------------------------ APIs
    # Over HTTP, POST /predict and /predict_batch are answered by hot routes in front of BentoML
    # (serving.online, serving.predict_batch) with these same request models; these methods serve
    # in-process calls and document the APIs.

    @bentoml.api(input_spec=PredictInput)
    async def predict(self, customer: Customer, explain: bool = False) -> Prediction:  # type: ignore[valid-type]
        """Churn probability for one customer; `explain: true` adds per-feature contributions."""
        telemetry.record_since_request_start("validate")
        with telemetry.stage("featurize"):
            row = row_values(customer)
        try:
            p = await self.engine.predict_one(row, route=PREDICT)
            explanation = await self.engine.explain(row, route=None) if explain else None
            return Prediction(**self.engine.prediction(p, explanation))
        except Overloaded as exc:
            return _shed(exc)

    @bentoml.api(input_spec=BatchInput)
    async def predict_batch(self, customers: list[dict]) -> BatchPrediction:
        """Churn probabilities for 1 to BANKCHURN_MAX_BATCH_ROWS customers, in input order."""
        telemetry.record_since_request_start("receive")
        try:
            body = await self.engine.score_records(customers, route=PREDICT_BATCH)
        except BatchValidationError as exc:
            return error_response(400, "; ".join(describe_validation_errors(exc.errors)), detail=exc.errors)
        except Overloaded as exc:
            return _shed(exc)
        return Response(body, media_type="application/json")

    @bentoml.api(input_spec=ExplainInput)
    async def explain(self, customer: Customer) -> Explanation:  # type: ignore[valid-type]
        """Per-feature contributions to the churn log-odds; base_value + their sum = log_odds."""
        try:
            return Explanation(**await self.engine.explain(row_values(customer), route=EXPLAIN))
        except Overloaded as exc:
            return _shed(exc)

    @bentoml.api(input_spec=NoInput)
    async def model_card(self) -> dict:
        """The served model: tag, creation time, backend, metrics (test split and cross-validated),
        the threshold and the money behind it, per-group metrics, calibration, tuning and schema."""
        meta = self.predictor.bundle.metadata
        return {
            "tag": self.tag,
            "created": self.predictor.bundle.created,
            "serving_backend": self.predictor.backend,
            "serving_backend_reason": self.predictor.backend_reason,
            "threshold": self.predictor.threshold,
            "threshold_rule": meta.get("threshold_rule"),
            "metrics": meta.get("metrics"),
            "base_learners_test_roc_auc": meta.get("base_learners_test_roc_auc"),
            "cross_validation": meta.get("cross_validation"),
            "decision": meta.get("decision"),
            "group_metrics": meta.get("group_metrics"),
            "group_gaps": meta.get("group_gaps"),
            "calibration": meta.get("calibration"),
            "tuning": meta.get("tuning"),
            "compiled": meta.get("compiled"),
            "data": meta.get("data"),
            "library_versions": meta.get("library_versions"),
            "schema": schema_dict(),
            "limits": {
                "max_batch_rows": settings.max_batch_rows,
                "max_csv_rows": settings.max_csv_rows,
                "max_upload_bytes": settings.max_upload_bytes,
            },
            "jobs": {"store": self.jobs.backend, "workers_here": settings.job_workers},
        }


def _shed(exc: Overloaded) -> Response:
    err = overloaded(exc)
    return error_response(err.status, err.message, headers=err.headers)


BankChurn.add_asgi_middleware(HotRoutes, table=HOT_ROUTES)
