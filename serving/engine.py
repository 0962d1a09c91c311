"""The engine: the loaded model and what runs it, the one door every prediction passes.

BentoML's APIs (/predict_batch, /explain, in-process /predict), the hot routes (/predict, serving.edge),
the Open Inference Protocol routes and the scoring jobs all score through one Engine per
process, and only here: the model call, the decision (`decide`: p >= threshold, written
once), the prediction metrics and the prediction log. Online work runs on one bounded
inference pool (single rows through one micro-batcher) and one explanation pool; the async
methods only submit and await. The jobs call the sync `score_columns` on their own
low-priority threads, never on the online pool.

Every scoring call names its route; the request id comes from the request's context
(serving.requestid), a job's rows bring their job id and row numbers.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from models.schema import validate_rows
from serving import requestid, telemetry
from serving.concurrency import InferencePool, MicroBatcher
from serving.predictionlog.writer import PredictionLog, Scored
from serving.settings import Settings

if TYPE_CHECKING:  # service.py imports this module in the `bentoml serve` arbiter too: no NumPy there
    from collections.abc import Sequence

    import numpy as np

    from models.predictor import Predictor

# Routes as the prediction log names them.
PREDICT = "/predict"
PREDICT_BATCH = "/predict_batch"
EXPLAIN = "/explain"
V2_INFER = "/v2/models/bank_churn/infer"
V2_GRPC = "inference.GRPCInferenceService/ModelInfer"
JOBS = "/jobs"


# The largest micro-batch run on the event loop when no other batch is running
# (MicroBatcher(inline_max=...)); ~0.3 ms of the compiled model.
INLINE_BATCH_ROWS = 16


class Engine:
    def __init__(self, predictor: Predictor, settings: Settings, log: PredictionLog | None = None):
        self.predictor = predictor
        self.settings = settings
        self.tag = predictor.bundle.tag
        self.threshold = predictor.threshold
        self.log = (log if log is not None else PredictionLog.from_settings(settings, self.tag)).start()
        self.pool = InferencePool(settings.inference_threads, settings.max_queue)
        # Explanations (~1,000x the work of a prediction) get their own pool, so they never
        # hold up /predict batches queued behind them.
        self.explain_pool = InferencePool(settings.explain_threads, settings.max_explain_queue, name="explain")
        self.batcher = MicroBatcher(
            self._score_singles,
            self.pool,
            max_batch=settings.micro_batch_rows,
            max_pending=settings.max_queue,
            on_wait=telemetry.STAGE_SECONDS.labels("queue").observe,
            # Small batches of the compiled model (~50 us a row) run on the event loop when the
            # pool is idle; scikit-learn's (~10 ms a row) would hold up every other request.
            inline_max=INLINE_BATCH_ROWS if predictor.backend == "onnxruntime" else 0,
        )
        telemetry.set_model_info(self.tag, predictor.backend)
        telemetry.watch(self.batcher, self.pool, self.explain_pool, log=self.log)

    def decide(self, p: Any) -> Any:
        """The decision: will_churn = churn_probability >= threshold, for a probability or an
        array of them. Every answer and every log record takes it from here."""
        return p >= self.threshold

    # ------------------------------------------------------------------ async edges

    async def predict_one(self, row: tuple, *, route: str) -> float:
        """P(churn) of one validated row, coalesced with concurrent callers into one batch.
        Raises Overloaded when the batcher's queue is full."""
        return await self.batcher.submit((row, route, requestid.current()))

    async def explain(self, row: tuple, *, route: str | None) -> dict[str, Any]:
        """Per-feature contributions for one row; logged under `route` unless None (the row's
        prediction was logged already, as /predict with explain does)."""
        return await self.explain_pool.run(self.explain_row, row, route)

    async def score_records(self, records: list[Any], *, route: str, prefix: str = "customers") -> bytes:
        """/predict_batch: validate raw records and score them on the pool; the JSON body.
        Raises BatchValidationError naming every bad field, or Overloaded."""
        return await self.pool.run(self._score_records, records, prefix, route)

    async def predict_columns(
        self, numeric: np.ndarray, categorical: dict[str, np.ndarray], *, route: str
    ) -> np.ndarray:
        """P(churn) for columns validated elsewhere (the Open Inference Protocol's tensors)."""
        proba, _ = await self.pool.run(self._score_request_columns, numeric, categorical, route)
        return proba

    def prediction(self, p: float, explanation: dict | None = None) -> dict[str, Any]:
        """One customer's answer, as /predict returns it."""
        return {
            "churn_probability": p,
            "will_churn": self.decide(p),
            "threshold": self.threshold,
            "model_version": self.tag,
            "explanation": explanation,
        }

    def shutdown(self) -> None:
        self.pool.shutdown()
        self.explain_pool.shutdown()
        self.log.close()

    # ------------------------------------------------------------------ sync core

    def score_columns(
        self,
        numeric: np.ndarray,
        categorical: dict[str, np.ndarray],
        *,
        route: str,
        job_id: str | None = None,
        row_numbers: np.ndarray | None = None,
        customer_ids: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and decisions for validated columns (numeric float64 [n, 8] in schema
        order, one object array per category), logged with the job's id, row numbers and
        CustomerIds when given (else with the request's id). Blocking: jobs call it on their
        own threads."""
        proba = self._model(len(numeric), self.predictor.predict_columns, numeric, categorical)
        decisions = self._decided(
            proba,
            route,
            None if job_id is not None else requestid.current(),
            columns=(numeric, categorical),
            job_id=job_id,
            row_numbers=row_numbers,
            customer_ids=customer_ids,
        )
        return proba, decisions

    def explain_row(self, row: tuple, route: str | None = None) -> dict[str, Any]:
        with telemetry.stage("explain"):
            explanation = self.predictor.explain(row)
        if route is not None:
            self._decided(_array([explanation["churn_probability"]]), route, requestid.current(), rows=[row])
        return explanation

    def _model(self, n: int, predict: Any, *args: Any) -> np.ndarray:
        telemetry.BATCH_ROWS.observe(n)
        with telemetry.stage("predict"):
            return predict(*args)

    def _decided(self, proba: np.ndarray, route: str | Sequence[str], request_id: Any, **scored: Any) -> np.ndarray:
        """The decisions for scored probabilities, counted, and the batch handed to the
        prediction log (`scored`: the rows or columns and where they came from)."""
        decisions = self.decide(proba)
        telemetry.record_decisions(decisions)
        self.log.add(Scored(time.time(), proba, decisions, route, request_id, **scored))
        return decisions

    def _score_singles(self, items: list[tuple[tuple, str, str | None]]) -> list[float]:
        """The micro-batcher's batch: (row, route, request id) of each coalesced caller."""
        rows, routes, request_ids = zip(*items, strict=True)
        proba = self._model(len(rows), self.predictor.predict_rows, rows)
        self._decided(proba, routes, request_ids, rows=rows)
        return proba.tolist()

    def _score_records(self, records: list[Any], prefix: str, route: str) -> bytes:
        with telemetry.stage("validate"):
            rows = validate_rows(records, prefix=prefix)
        proba = self._model(len(rows), self.predictor.predict_rows, rows)
        decisions = self._decided(proba, route, requestid.current(), rows=rows, row_numbers=range(1, len(rows) + 1))
        threshold, tag = self.threshold, self.tag
        return json.dumps(
            {
                "predictions": [
                    {"churn_probability": p, "will_churn": d, "threshold": threshold, "model_version": tag}
                    for p, d in zip(proba.tolist(), decisions.tolist(), strict=True)
                ]
            }
        ).encode()

    def _score_request_columns(
        self, numeric: np.ndarray, categorical: dict[str, np.ndarray], route: str
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.score_columns(numeric, categorical, route=route, row_numbers=range(1, len(numeric) + 1))


def _array(values: list[float]) -> np.ndarray:
    import numpy as np

    return np.asarray(values, dtype=np.float64)
