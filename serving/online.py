"""POST /predict as a hot route (serving.edge): same request model, same answers and the
same error bodies as the BentoML API it stands in front of, without BentoML's per-request
machinery. The BentoML API stays declared, so /docs.json, /schema.json and BentoML's Python
clients see /predict as before; the BentoML implementation answers in-process calls."""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
from starlette.types import Receive, Scope, Send

from models.schema import row_values
from serving import telemetry
from serving.concurrency import Overloaded
from serving.edge import media_type, overloaded, read_body, send_json, validation_error
from serving.engine import PREDICT, Engine


class PredictRoute:
    """POST /predict: {"customer": {...}, "explain": false} -> a Prediction."""

    def __init__(self, engine: Engine, request_model: type[pydantic.BaseModel], max_body_bytes: int):
        self.engine = engine
        self.request_model = request_model
        self.max_body_bytes = max_body_bytes

    @staticmethod
    def accepts(scope: Scope) -> bool:
        """JSON bodies only: BentoML's own route keeps its multipart encoding of the same API
        and its answers to other media types."""
        return media_type(scope) in ("", "application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(scope, receive, self.max_body_bytes)
        try:
            # An empty body is an empty object, as BentoML reads it ("customer: Field required").
            request: Any = self.request_model.model_validate_json(body or b"{}")
        except pydantic.ValidationError as exc:
            raise validation_error(exc) from None
        telemetry.record_since_request_start("validate")
        with telemetry.stage("featurize"):
            row = row_values(request.customer)
        try:
            p = await self.engine.predict_one(row, route=PREDICT)
            explanation = await self.engine.explain(row, route=None) if request.explain else None
        except Overloaded as exc:
            raise overloaded(exc) from None
        await send_json(send, 200, orjson.dumps(self.engine.prediction(p, explanation)))
