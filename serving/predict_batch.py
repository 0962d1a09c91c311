"""POST /predict_batch as a hot route (serving.edge): the same request model, answers and error
bodies as the BentoML API it stands in front of, at the model's own speed.

A batch whose every row is valid (the usual case) is decoded by msgspec straight from its bytes
into typed rows (the schema's types, bounds and categories, unknown fields refused), turned into
columns and scored in one model call (Engine.predict_columns). Anything msgspec refuses takes
BentoML's own way, so every error is worded as before: the request model (BatchInput: 400
naming `customers`), then the rows by /predict's Customer model on the pool (400 naming each
`customers.<i>.<field>`). The BentoML API stays declared: /docs.json, BentoML's Python clients
and in-process calls see /predict_batch as before.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import orjson
import pydantic
from starlette.types import Receive, Scope, Send

from models.schema import BY_NAME, CATEGORICAL_FEATURES, FEATURE_NAMES, NUMERIC_FEATURES, BatchValidationError
from serving import telemetry
from serving.concurrency import Overloaded
from serving.edge import (
    HttpError,
    describe_validation_errors,
    media_type,
    overloaded,
    read_body,
    send_json,
    validation_error,
)
from serving.engine import PREDICT_BATCH, Engine

# Bodies up to this size are decoded on the event loop (a 50-row batch is ~10 KiB), bigger ones
# on the engine's pool: decoding 10,000 rows takes ~10 ms, which would hold up every request.
INLINE_BODY_BYTES = 16 * 1024


def _customer_struct() -> type[msgspec.Struct]:
    """A customer as msgspec decodes it: what models.schema.Customer accepts, no more (strict
    types, the same bounds and categories, no unknown fields)."""
    fields: list[tuple[str, Any]] = []
    for name in FEATURE_NAMES:
        feat = BY_NAME[name]
        if feat.kind == "category":
            fields.append((name, Literal[feat.categories]))  # type: ignore[valid-type]
        elif feat.kind == "float":
            fields.append((name, Annotated[float, msgspec.Meta(ge=feat.minimum, le=feat.maximum)]))
        else:
            lo, hi = (0, 1) if feat.kind == "flag" else (int(feat.minimum), int(feat.maximum))
            fields.append((name, Annotated[int, msgspec.Meta(ge=lo, le=hi)]))
    return msgspec.defstruct("CustomerRow", fields, forbid_unknown_fields=True)


_CUSTOMER = _customer_struct()
_NUMBERS = operator.attrgetter(*NUMERIC_FEATURES)


def batch_decoder(max_rows: int) -> msgspec.json.Decoder:
    body = msgspec.defstruct(
        "BatchBody",
        [("customers", Annotated[list[_CUSTOMER], msgspec.Meta(min_length=1, max_length=max_rows)])],  # type: ignore[valid-type]
        forbid_unknown_fields=True,
    )
    return msgspec.json.Decoder(body)


def fast_columns(decoder: msgspec.json.Decoder, body: bytes) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """A batch whose every row is valid, as columns (numeric float64 [n, 8] in schema order,
    one object array per category); None for anything else (BentoML's way words the error)."""
    try:
        customers = decoder.decode(body).customers
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    numeric = np.array(list(map(_NUMBERS, customers)), dtype=np.float64)
    if not np.isfinite(numeric).all():  # msgspec reads 1e999 as inf; pydantic refuses it
        return None
    categorical = {}
    for name in CATEGORICAL_FEATURES:
        column = np.empty(len(customers), dtype=object)
        column[:] = [getattr(c, name) for c in customers]
        categorical[name] = column
    return numeric, categorical


def predictions_json(proba: np.ndarray, decisions: np.ndarray, threshold: float, tag: str) -> bytes:
    """{"predictions": [...]}, as Engine.score_records answers, without a dict per row; the
    decisions are the engine's (Engine.decide)."""
    tail = orjson.dumps({"threshold": threshold, "model_version": tag})[1:]  # '"threshold":...}'
    churn, stay = b',"will_churn":true,' + tail, b',"will_churn":false,' + tail
    parts = [
        b'{"churn_probability":' + orjson.dumps(p) + (churn if d else stay)
        for p, d in zip(proba.tolist(), decisions.tolist(), strict=True)
    ]
    return b'{"predictions":[' + b",".join(parts) + b"]}"


class PredictBatchRoute:
    """POST /predict_batch: {"customers": [{...}, ...]} -> {"predictions": [...]}."""

    def __init__(self, engine: Engine, request_model: type[pydantic.BaseModel], max_body_bytes: int, max_rows: int):
        self.engine = engine
        self.request_model = request_model
        self.max_body_bytes = max_body_bytes
        self.decoder = batch_decoder(max_rows)

    @staticmethod
    def accepts(scope: Scope) -> bool:
        """JSON bodies only, as /predict's hot route."""
        return media_type(scope) in ("", "application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(scope, receive, self.max_body_bytes)
        try:
            if len(body) <= INLINE_BODY_BYTES:
                columns = fast_columns(self.decoder, body)
            else:
                columns = await self.engine.pool.run(fast_columns, self.decoder, body)
            telemetry.record_since_request_start("validate")
            if columns is not None:
                proba = await self.engine.predict_columns(*columns, route=PREDICT_BATCH)
                payload = predictions_json(proba, self.engine.decide(proba), self.engine.threshold, self.engine.tag)
            else:
                payload = await self.slow_way(body)
        except Overloaded as exc:
            raise overloaded(exc) from None
        await send_json(send, 200, payload)

    async def slow_way(self, body: bytes) -> bytes:
        """BentoML's way, for a batch msgspec refused: its words for every error."""
        try:
            # An empty body is an empty object, as BentoML reads it ("customers: Field required").
            request: Any = self.request_model.model_validate_json(body or b"{}")
        except pydantic.ValidationError as exc:
            raise validation_error(exc) from None
        try:
            return await self.engine.score_records(request.customers, route=PREDICT_BATCH)
        except BatchValidationError as exc:
            raise HttpError(400, "; ".join(describe_validation_errors(exc.errors)), detail=exc.errors) from None
