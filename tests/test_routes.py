"""The hot routes in front of BentoML's middleware (serving.edge): the same answers as the
BentoML API they stand in for, and the metrics, access log and spans operators rely on."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from harness.servers import metric, serving
from models.schema import EXAMPLE_CUSTOMER

pytestmark = pytest.mark.integration  # real `bentoml serve` processes

CUSTOMER = EXAMPLE_CUSTOMER
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def via_bentoml(trained):
    """The same service with POST /predict left to BentoML's API machinery, logging every request."""
    env = {
        "BANKCHURN_MODEL_TAG": str(trained.model.tag),
        "BANKCHURN_PREDICT_ROUTE": "bentoml",
        "BANKCHURN_ACCESS_LOG": "all",
    }
    with serving(env=env) as proc:
        yield proc


# (id, raw body, content type): what clients send, good and bad
BODIES = [
    ("customer", json.dumps({"customer": CUSTOMER}), "application/json"),
    ("customer-explained", json.dumps({"customer": CUSTOMER, "explain": True}), "application/json"),
    ("no-content-type", json.dumps({"customer": CUSTOMER}), None),
    ("json-with-charset", json.dumps({"customer": CUSTOMER}), "application/json; charset=utf-8"),
    ("age-out-of-range", json.dumps({"customer": {**CUSTOMER, "Age": 12}}), "application/json"),
    ("two-bad-fields", json.dumps({"customer": {**CUSTOMER, "Geography": "Italy", "Balance": -1.0}}), None),
    ("unknown-field", json.dumps({"customer": {**CUSTOMER, "Ages": 3}}), "application/json"),
    ("unknown-top-level-field", json.dumps({"customer": CUSTOMER, "explian": True}), "application/json"),
    ("explain-not-bool", json.dumps({"customer": CUSTOMER, "explain": "yes"}), "application/json"),
    ("number-as-string", json.dumps({"customer": {**CUSTOMER, "Age": "42"}}), "application/json"),
    ("float-for-int", json.dumps({"customer": {**CUSTOMER, "Tenure": 2.5}}), "application/json"),
    ("null-field", json.dumps({"customer": {**CUSTOMER, "Tenure": None}}), "application/json"),
    ("nan-literal", json.dumps({"customer": CUSTOMER}).replace("0.0", "NaN", 1), "application/json"),
    ("missing-customer", "{}", "application/json"),
    ("empty-body", "", "application/json"),
    ("invalid-json", '{"customer": ', "application/json"),
    ("customer-not-object", json.dumps({"customer": [1, 2]}), "application/json"),
]


@pytest.mark.parametrize(("body", "content_type"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_hot_predict_answers_exactly_as_bentomls_api(server, via_bentoml, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    hot = httpx.post(f"{server.url}/predict", content=body, headers=headers, timeout=30)
    bento = httpx.post(f"{via_bentoml.url}/predict", content=body, headers=headers, timeout=30)
    assert hot.status_code == bento.status_code, (hot.text, bento.text)
    assert hot.json() == bento.json()


def test_json_bodies_take_the_hot_route_and_others_go_to_bentoml(server):
    """The hot route counts its requests itself; a multipart body (BentoML's own encoding of the
    same API) is left to BentoML and still answered."""

    def hot_count() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return metric(text, "bank_churn_http_requests_total", default=0.0, route="/predict", status="200")

    before = hot_count()
    assert httpx.post(f"{server.url}/predict", json={"customer": CUSTOMER}).status_code == 200
    files = {"customer": ("customer.json", json.dumps(CUSTOMER), "application/json")}
    assert httpx.post(f"{server.url}/predict", files=files).status_code == 200
    deadline = time.monotonic() + 5  # counted just after the response is sent
    while hot_count() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hot_count() == before + 1


def test_hot_routes_are_in_front_of_bentomls_middleware(server):
    assert "hot routes served in front of BentoML's middleware" in server.log()


def log_count(proc, path: str, status: int, at_least: int = 0) -> int:
    """Access-log lines for path and status, waiting up to 5 s for `at_least` of them (a line
    is written just after the response is sent)."""
    deadline = time.monotonic() + 5
    while True:
        n = proc.log().count(f"path={path}) (status={status},")
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def test_access_log_logs_errors_only_by_default(server):
    ok, bad = log_count(server, "/predict", 200), log_count(server, "/predict", 400)
    batch_bad = log_count(server, "/predict_batch", 400)
    for _ in range(3):
        assert httpx.post(f"{server.url}/predict", json={"customer": CUSTOMER}).status_code == 200
    assert httpx.post(f"{server.url}/predict", json={"customer": {}}).status_code == 400
    assert httpx.post(f"{server.url}/predict_batch", json={"customers": []}).status_code == 400
    assert log_count(server, "/predict", 400, at_least=bad + 1) == bad + 1
    # BentoML's routes go through the same access log
    assert log_count(server, "/predict_batch", 400, at_least=batch_bad + 1) == batch_bad + 1
    assert log_count(server, "/predict", 200) == ok


def test_access_log_all_logs_every_request_but_probes(via_bentoml):
    before = log_count(via_bentoml, "/predict", 200)
    httpx.get(f"{via_bentoml.url}/readyz")
    httpx.post(f"{via_bentoml.url}/predict", json={"customer": CUSTOMER})
    assert log_count(via_bentoml, "/predict", 200, at_least=before + 1) == before + 1
    assert "path=/readyz)" not in via_bentoml.log()


def test_openapi_still_documents_predict_for_bentoml_clients(server):
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert "/predict" in spec["paths"] and "post" in spec["paths"]["/predict"]
    import bentoml

    with bentoml.SyncHTTPClient(server.url) as client:
        assert 0 <= client.predict(customer=CUSTOMER)["churn_probability"] <= 1
