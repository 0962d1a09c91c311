"""The engine: the loaded model and what runs it, shared by every edge of the service.

BentoML's APIs, the lean hot routes (serving.edge), the Open Inference Protocol routes
and the job workers all score through one Engine per process: one bounded inference pool,
one micro-batcher for single rows, one explanation pool. Blocking work runs on the pools;
the async methods here only submit and await.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from models.schema import validate_rows
from serving import telemetry
from serving.concurrency import InferencePool, MicroBatcher
from serving.settings import Settings

if TYPE_CHECKING:  # service.py imports this module in the `bentoml serve` arbiter too: no NumPy there
    import numpy as np

    from models.predictor import Predictor


# The largest micro-batch run on the event loop when no other batch is running
# (MicroBatcher(inline_max=...)); ~0.3 ms of the compiled model.
INLINE_BATCH_ROWS = 16


class Engine:
    def __init__(self, predictor: Predictor, settings: Settings):
        self.predictor = predictor
        self.settings = settings
        self.tag = predictor.bundle.tag
        self.threshold = predictor.threshold
        self.pool = InferencePool(settings.inference_threads, settings.max_queue)
        # Explanations (~1,000x the work of a prediction) get their own pool, so they never
        # hold up /predict batches queued behind them.
        self.explain_pool = InferencePool(settings.explain_threads, settings.max_explain_queue, name="explain")
        self.batcher = MicroBatcher(
            self.predict_rows,
            self.pool,
            max_batch=settings.micro_batch_rows,
            max_pending=settings.max_queue,
            on_batch=telemetry.BATCH_ROWS.observe,
            on_wait=telemetry.STAGE_SECONDS.labels("queue").observe,
            # Small batches of the compiled model (~50 us a row) run on the event loop when the
            # pool is idle; scikit-learn's (~10 ms a row) would hold up every other request.
            inline_max=INLINE_BATCH_ROWS if predictor.backend == "onnxruntime" else 0,
        )
        telemetry.set_model_info(self.tag, predictor.backend)
        telemetry.watch(self.batcher, self.pool, self.explain_pool)

    # ------------------------------------------------------------------ async edges

    async def predict_one(self, row: tuple) -> float:
        """P(churn) of one validated row, coalesced with concurrent callers into one batch.
        Raises Overloaded when the batcher's queue is full."""
        return await self.batcher.submit(row)

    async def explain(self, row: tuple) -> dict[str, Any]:
        return await self.explain_pool.run(self.explain_row, row)

    async def score_records(self, records: list[Any], prefix: str = "customers") -> bytes:
        """/predict_batch: validate raw records and score them on the pool; the JSON body.
        Raises BatchValidationError naming every bad field, or Overloaded."""
        return await self.pool.run(self._score_records, records, prefix)

    async def predict_columns(self, numeric: np.ndarray, categorical: dict[str, np.ndarray]) -> np.ndarray:
        """P(churn) for columns validated elsewhere (the Open Inference Protocol's tensors)."""
        return await self.pool.run(self._predict_columns, numeric, categorical)

    def shutdown(self) -> None:
        self.pool.shutdown()
        self.explain_pool.shutdown()

    # ------------------------------------------------------------------ sync core (pool threads)

    def predict_rows(self, rows: list[tuple]) -> list[float]:
        with telemetry.stage("predict"):
            proba = self.predictor.predict_rows(rows)
        telemetry.record_predictions(proba, self.threshold)
        return proba.tolist()

    def explain_row(self, row: tuple) -> dict[str, Any]:
        with telemetry.stage("explain"):
            return self.predictor.explain(row)

    def prediction(self, p: float, explanation: dict | None = None) -> dict[str, Any]:
        """One customer's answer, as /predict returns it."""
        return {
            "churn_probability": p,
            "will_churn": p >= self.threshold,
            "threshold": self.threshold,
            "model_version": self.tag,
            "explanation": explanation,
        }

    def _score_records(self, records: list[Any], prefix: str) -> bytes:
        with telemetry.stage("validate"):
            rows = validate_rows(records, prefix=prefix)
        telemetry.BATCH_ROWS.observe(len(rows))
        probabilities = self.predict_rows(rows)
        threshold, tag = self.threshold, self.tag
        return json.dumps(
            {
                "predictions": [
                    {"churn_probability": p, "will_churn": p >= threshold, "threshold": threshold, "model_version": tag}
                    for p in probabilities
                ]
            }
        ).encode()

    def _predict_columns(self, numeric: np.ndarray, categorical: dict[str, np.ndarray]) -> np.ndarray:
        telemetry.BATCH_ROWS.observe(len(numeric))
        with telemetry.stage("predict"):
            proba = self.predictor.predict_columns(numeric, categorical)
        telemetry.record_predictions(proba, self.threshold)
        return proba
