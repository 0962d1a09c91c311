"""Metrics on /metrics move with traffic; tracing spans go where the environment says."""

from __future__ import annotations

import time

import httpx
import pytest

from harness.servers import metric, serving
from models.schema import EXAMPLE_CUSTOMER

pytestmark = pytest.mark.integration  # real `bentoml serve` processes


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def test_custom_metrics_move(server, trained):
    before = scrape(server.url)
    for _ in range(5):
        httpx.post(f"{server.url}/predict", json={"customer": EXAMPLE_CUSTOMER}, timeout=30)
    httpx.post(f"{server.url}/predict_batch", json={"customers": [EXAMPLE_CUSTOMER] * 7}, timeout=30)
    httpx.post(f"{server.url}/explain", json={"customer": EXAMPLE_CUSTOMER}, timeout=30)
    # A hot route counts a request just after sending its response: wait for the last one.
    deadline = time.monotonic() + 5
    while True:
        after = scrape(server.url)
        done = metric(after, "bank_churn_http_request_duration_seconds_count", default=0.0, route="/predict")
        if done - metric(before, "bank_churn_http_request_duration_seconds_count", default=0.0, route="/predict") >= 5:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, default=0.0, **labels)

    assert delta("bank_churn_predictions_total") == 13  # 5 singles + 7 batch rows + 1 explained
    assert delta("bank_churn_batch_rows_sum") == 12 and delta("bank_churn_batch_rows_count") == 6
    for stage in ("validate", "featurize", "queue", "predict"):
        assert delta("bank_churn_stage_duration_seconds_count", stage=stage) >= 5, stage
    assert delta("bank_churn_stage_duration_seconds_count", stage="explain") == 1
    assert metric(after, "bank_churn_model_info", tag=str(trained.model.tag), backend="onnxruntime") == 1
    assert metric(after, "bank_churn_pool_threads") >= 1
    assert metric(after, "bank_churn_pool_busy_threads") == 0 and metric(after, "bank_churn_pool_queued_jobs") == 0
    # /predict and /predict_batch are hot routes with their own request metrics; BentoML's cover the other APIs
    assert delta("bank_churn_http_requests_total", route="/predict", method="POST", status="200") == 5
    assert delta("bank_churn_http_request_duration_seconds_count", route="/predict") == 5
    assert delta("bank_churn_http_requests_total", route="/predict_batch", method="POST", status="200") == 1
    assert metric(after, "bank_churn_http_requests_in_progress", route="/predict_batch", method="POST") == 0
    assert metric(after, "bentoml_service_request_total", endpoint="/explain") >= 1


def test_tracing_exporter_from_environment(trained):
    """BANKCHURN_OTEL_EXPORTER=console prints one span per stage of a real request."""
    env = {"BANKCHURN_MODEL_TAG": str(trained.model.tag), "BANKCHURN_OTEL_EXPORTER": "console"}
    with serving(env=env) as proc:
        r = httpx.post(f"{proc.url}/predict", json={"customer": EXAMPLE_CUSTOMER, "explain": True}, timeout=30)
        assert r.status_code == 200
    log = proc.log()
    for span in ("bank_churn.validate", "bank_churn.featurize", "bank_churn.predict", "bank_churn.explain"):
        assert f'"name": "{span}"' in log, span
