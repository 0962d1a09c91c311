"""The service class in-process: called directly, and through its ASGI app."""

from __future__ import annotations

import asyncio
import os

import pytest
from starlette.testclient import TestClient

from models.schema import EXAMPLE_CUSTOMER, Customer, frame_from_rows


@pytest.fixture(scope="module")
def service_module(trained):
    # service.py reads its settings at import; point it at the session's model first.
    os.environ["BANKCHURN_MODEL_TAG"] = str(trained.model.tag)
    try:
        import service
    finally:
        del os.environ["BANKCHURN_MODEL_TAG"]
    assert str(service.STORED_MODEL.tag) == str(trained.model.tag)
    return service


@pytest.fixture(scope="module")
def client(service_module):
    # One ASGI app per process: a second to_asgi() clashes on Prometheus metrics (bentoml 1.4).
    with TestClient(service_module.BankChurn.to_asgi()) as c:
        yield c


def test_direct_call(service_module, trained):
    svc = service_module.BankChurn()
    assert asyncio.run(svc.__is_ready__())
    out = asyncio.run(svc.predict(customer=Customer(**EXAMPLE_CUSTOMER)))
    expected = trained.pipeline.predict_proba(frame_from_rows([EXAMPLE_CUSTOMER]))[0, 1]
    assert out.churn_probability == pytest.approx(expected, abs=1e-6)
    assert out.model_version == str(trained.model.tag)


def test_asgi_app_serves_and_validates(client):
    assert client.get("/readyz").status_code == 200
    ok = client.post("/predict", json={"customer": EXAMPLE_CUSTOMER})
    assert ok.status_code == 200 and 0 <= ok.json()["churn_probability"] <= 1
    bad = client.post("/predict", json={"customer": {**EXAMPLE_CUSTOMER, "Gender": "X"}})
    assert bad.status_code == 400 and bad.json()["error"].startswith("customer.Gender:")


def test_body_limit_is_413(client, service_module):
    limit = service_module.settings.max_body_bytes
    r = client.post("/predict", content=b"x" * (limit + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(limit) in r.json()["error"]


def test_tracing_is_off_by_default_and_spans_each_stage_when_on(client):
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving import telemetry

    assert isinstance(telemetry._tracer, trace.NoOpTracer)  # BANKCHURN_OTEL_EXPORTER defaults to none
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing(exporter)
    try:
        assert client.post("/predict", json={"customer": EXAMPLE_CUSTOMER, "explain": True}).status_code == 200
        assert client.post("/predict_batch", json={"customers": [EXAMPLE_CUSTOMER] * 3}).status_code == 200
    finally:
        telemetry.configure_tracing("none")
    names = [s.name for s in exporter.get_finished_spans()]
    for stage in ("validate", "featurize", "predict", "explain"):
        assert f"bank_churn.{stage}" in names, names
    assert names.count("bank_churn.validate") == 2
    spans = exporter.get_finished_spans()
    featurize = next(s for s in spans if s.name == "bank_churn.featurize")
    predict = next(s for s in spans if s.name == "bank_churn.predict")
    assert predict.end_time > predict.start_time
    # the pool thread's span belongs to the request's trace
    assert predict.context.trace_id == featurize.context.trace_id


def test_hot_route_spans_continue_the_callers_trace(client):
    """POST /predict is answered in front of BentoML's middleware (serving.edge): its server
    span continues the caller's W3C trace and every stage span nests under it."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving import telemetry

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    exporter = InMemorySpanExporter()
    telemetry.configure_tracing(exporter)
    try:
        headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
        r = client.post("/predict", json={"customer": EXAMPLE_CUSTOMER}, headers=headers)
        assert r.status_code == 200
    finally:
        telemetry.configure_tracing("none")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server = spans["POST /predict"]
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.attributes["http.response.status_code"] == 200
    for stage in ("featurize", "predict"):
        span = spans[f"bank_churn.{stage}"]
        assert span.context.trace_id == server.context.trace_id
    assert spans["bank_churn.featurize"].parent.span_id == server.context.span_id


TRAINING_STACK = ("sklearn", "xgboost", "lightgbm", "pandas", "scipy", "joblib")
_IMPORTS = """
import asyncio, json, sys
import service
arbiter = sorted(m for m in {stack} + ("onnxruntime", "numpy") if m in sys.modules)
svc = service.BankChurn()
from models.schema import EXAMPLE_CUSTOMER, Customer
asyncio.run(svc.predict(customer=Customer(**EXAMPLE_CUSTOMER), explain=True))
asyncio.run(svc.explain(customer=Customer(**EXAMPLE_CUSTOMER)))
worker = sorted(m for m in {stack} if m in sys.modules)
print(json.dumps({{"arbiter": arbiter, "worker": worker, "backend": svc.predictor.backend}}))
"""


@pytest.mark.parametrize(("use_compiled", "worker_imports"), [("true", []), ("false", ["joblib", "sklearn"])])
def test_serving_imports_only_what_its_backend_needs(trained, use_compiled, worker_imports):
    """What `bentoml serve` imports: the arbiter (`import service`) checks the model without
    loading it (no ONNX Runtime, no NumPy, no scikit-learn); the worker serving the compiled model,
    explanations included, never imports the training stack; the fallback does."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "BANKCHURN_MODEL_TAG": str(trained.model.tag), "BANKCHURN_USE_COMPILED": use_compiled}
    code = _IMPORTS.format(stack=repr(TRAINING_STACK))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["arbiter"] == []
    assert found["backend"] == ("onnxruntime" if use_compiled == "true" else "sklearn")
    assert set(worker_imports) <= set(found["worker"])
    if use_compiled == "true":
        assert found["worker"] == []
