"""The hand-written baseline of the HTTP benchmark: one FastAPI route serving the Open Inference
Protocol's infer (JSON) for the same model, on uvicorn with uvloop and httptools.

    python -m benchmarks.fastapi_v2 --port 3100     # GET /readyz, POST /v2/models/bank_churn/infer

The least a careful engineer would write by hand: the body decoded by msgspec into typed
structs, the columns checked by models/columns.py (validate_columns, /predict's rules), the
model-store entry's predictor called inline (no pool, no micro-batcher), the answer written by
orjson. No metrics, no tracing, no access log, no timeout, no limits: what this service adds
around the same work is what the benchmark compares.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
import numpy as np
import orjson
from fastapi import FastAPI, Request, Response

from models.columns import validate_columns
from models.predictor import load_predictor
from models.schema import CATEGORICAL_FEATURES, FEATURE_NAMES, NUMERIC_FEATURES
from models.store import MODEL_NAME, get_stored


class Tensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferBody(msgspec.Struct):
    inputs: list[Tensor]
    id: str | None = None


def create_app(tag: str) -> FastAPI:
    predictor = load_predictor(get_stored(tag))
    threshold, version = predictor.threshold, predictor.bundle.version
    decoder = msgspec.json.Decoder(InferBody)
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(b"ok")

    @app.post(f"/v2/models/{MODEL_NAME}/infer")
    async def infer(request: Request) -> Response:
        try:
            body = decoder.decode(await request.body())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Response(orjson.dumps({"error": str(exc)}), status_code=400, media_type="application/json")
        columns = {t.name: t.data for t in body.inputs}
        if set(columns) != set(FEATURE_NAMES):
            return Response(b'{"error": "one input per feature"}', status_code=400, media_type="application/json")
        n = len(columns[FEATURE_NAMES[0]])
        if n > 8:  # as arrays, as models/columns.py takes big batches
            columns = {
                name: np.asarray(columns[name], dtype=np.float64 if name in NUMERIC_FEATURES else object)
                for name in FEATURE_NAMES
            }
        checked = validate_columns(columns)
        if checked.errors:
            message = "; ".join(f"input '{f}', row {r}: {m}" for r, f, m in checked.errors[:10])
            return Response(orjson.dumps({"error": message}), status_code=400, media_type="application/json")
        proba = predictor.predict_columns(checked.numeric, {c: checked.categorical[c] for c in CATEGORICAL_FEATURES})
        answer = {
            "model_name": MODEL_NAME,
            "model_version": version,
            "outputs": [
                {"name": "churn_probability", "datatype": "FP64", "shape": [n], "data": proba},
                {"name": "will_churn", "datatype": "BOOL", "shape": [n], "data": proba >= threshold},
            ],
        }
        if body.id is not None:
            answer["id"] = body.id
        return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from serving.settings import Settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3100)
    p.add_argument("--tag", default=Settings().model_tag)
    a = p.parse_args(argv)
    uvicorn.run(create_app(a.tag), host=a.host, port=a.port, loop="uvloop", http="httptools", access_log=False)


if __name__ == "__main__":
    main()
