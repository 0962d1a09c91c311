"""The Open Inference Protocol (KServe V2) under /v2: a real `bentoml serve` over real HTTP with
our own JSON (third-party clients: test_v2_clients.py; hostile bodies: test_fuzz.py), and the
service's readiness through the mounted app in-process."""

from __future__ import annotations

import asyncio
import copy
import os
import time
from importlib.metadata import version

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.servers import metric
from harness.v2 import binary_request, read_binary_response
from models.schema import BY_NAME, EXAMPLE_CUSTOMER, FEATURE_NAMES, NUMERIC_FEATURES, json_customer
from models.store import MODEL_NAME
from serving.v2.codec import (
    BYTES,
    FP64,
    INPUT_DATATYPES,
    INT64,
    OUTPUT_DECISION,
    OUTPUT_PROBABILITY,
    OUTPUTS,
    PARAM_MODEL_VERSION,
    PARAM_THRESHOLD,
    PREFIX,
    SERVER_NAME,
    BadRequest,
    checked_columns,
    columnar_request,
    fast_single_row,
    parse_request,
)

MODEL = f"{PREFIX}/models/{MODEL_NAME}"
INFER = f"{MODEL}/infer"


def post(server, body, path: str = INFER, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


def probabilities(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text[:500]
    (out,) = [o for o in response.json()["outputs"] if o["name"] == OUTPUT_PROBABILITY]
    return out["data"]


@pytest.fixture(scope="module")
def customers(sample_rows) -> list[dict]:
    return [json_customer(r) for r in sample_rows]


@pytest.fixture(scope="module")
def batch(server, customers) -> dict:
    """/predict_batch's answer for the same customers: what V2 must equal."""
    r = httpx.post(f"{server.url}/predict_batch", json={"customers": customers}, timeout=60)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    return {
        "probability": [p["churn_probability"] for p in predictions],
        "decision": [p["will_churn"] for p in predictions],
        "tag": predictions[0]["model_version"],
        "threshold": predictions[0]["threshold"],
    }


# ----------------------------------------------------------------------------- health and metadata


def test_server_metadata_and_health(server):
    for path in (PREFIX, f"{PREFIX}/"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 200
        assert r.json() == {"name": SERVER_NAME, "version": version("bentoml"), "extensions": ["binary_tensor_data"]}
    assert httpx.get(f"{server.url}{PREFIX}/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}{PREFIX}/health/ready").json() == {"ready": True}


def test_declared_datatypes_follow_the_schema():
    expected = {
        **dict.fromkeys(("CreditScore", "Age", "Tenure", "NumOfProducts", "HasCrCard", "IsActiveMember"), INT64),
        **dict.fromkeys(("Balance", "EstimatedSalary"), FP64),
        **dict.fromkeys(("Geography", "Gender"), BYTES),
    }
    assert expected == INPUT_DATATYPES
    assert list(INPUT_DATATYPES) == list(FEATURE_NAMES)


@pytest.mark.parametrize("versioned", [False, True], ids=["model", "served-version"])
def test_model_metadata_and_readiness(server, trained, versioned):
    served = trained.model.tag.version
    base = f"{MODEL}/versions/{served}" if versioned else MODEL
    r = httpx.get(f"{server.url}{base}")
    assert r.status_code == 200
    assert r.json() == {
        "name": MODEL_NAME,
        "versions": [served],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": n, "datatype": INPUT_DATATYPES[n], "shape": [-1]} for n in FEATURE_NAMES],
        "outputs": [{"name": n, "datatype": d, "shape": [-1]} for n, d in OUTPUTS.items()],
    }
    r = httpx.get(f"{server.url}{base}/ready")
    assert (r.status_code, r.json()) == (200, {"name": MODEL_NAME, "ready": True})
    assert probabilities(post(server, columnar_request([EXAMPLE_CUSTOMER]), path=f"{base}/infer"))


@pytest.mark.parametrize(
    ("method", "path", "says"),
    [
        ("GET", f"{PREFIX}/models/churn", "unknown model 'churn': this server serves 'bank_churn'"),
        ("GET", f"{PREFIX}/models/churn/ready", "unknown model 'churn'"),
        ("POST", f"{PREFIX}/models/churn/infer", "unknown model 'churn'"),
        ("GET", f"{MODEL}/versions/1", "model 'bank_churn' has no version '1': the served version is"),
        ("GET", f"{MODEL}/versions/1/ready", "has no version '1'"),
        ("POST", f"{MODEL}/versions/1/infer", "has no version '1'"),
        ("GET", f"{MODEL}/config", "no Open Inference Protocol endpoint at '/v2/models/bank_churn/config'"),
        ("GET", f"{MODEL}/stats", "no Open Inference Protocol endpoint"),
        ("POST", f"{PREFIX}/repository/index", "no Open Inference Protocol endpoint"),
        ("GET", f"{PREFIX}/models", "no Open Inference Protocol endpoint"),
        ("GET", f"{PREFIX}/health", "no Open Inference Protocol endpoint"),
        ("GET", f"{PREFIX}/{'x' * 10_000}", "no Open Inference Protocol endpoint"),
    ],
)
def test_other_models_versions_and_paths_are_404_with_an_error(server, method, path, says):
    r = httpx.request(method, f"{server.url}{path}", timeout=30)
    assert r.status_code == 404, r.text[:300]
    assert says in r.json()["error"] and len(r.json()["error"]) < 300


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", PREFIX, "GET, HEAD"),
        ("DELETE", f"{PREFIX}/health/live", "GET, HEAD"),
        ("POST", f"{PREFIX}/health/ready", "GET, HEAD"),
        ("PUT", MODEL, "GET, HEAD"),
        ("POST", f"{MODEL}/ready", "GET, HEAD"),
        ("GET", INFER, "POST"),
    ],
)
def test_wrong_method_is_405_with_allow(server, method, path, allow):
    r = httpx.request(method, f"{server.url}{path}")
    assert r.status_code == 405 and r.headers["allow"] == allow
    assert f"(allowed: {allow})" in r.json()["error"]


def test_head_answers_like_get_without_a_body(server):
    r = httpx.head(f"{server.url}{PREFIX}/health/ready")
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0


# ----------------------------------------------------------------------------- inference


def test_infer_gives_predict_batchs_numbers(server, customers, batch, trained):
    r = post(server, columnar_request(customers))
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["model_name"] == MODEL_NAME and body["model_version"] == trained.model.tag.version
    assert body["parameters"] == {PARAM_MODEL_VERSION: batch["tag"], PARAM_THRESHOLD: batch["threshold"]}
    assert "id" not in body
    n = len(customers)
    assert body["outputs"] == [
        {"name": OUTPUT_PROBABILITY, "datatype": FP64, "shape": [n], "data": batch["probability"]},
        {"name": OUTPUT_DECISION, "datatype": "BOOL", "shape": [n], "data": batch["decision"]},
    ]


def test_single_rows_give_predicts_numbers(server, customers):
    for customer in customers[:10]:
        single = httpx.post(f"{server.url}/predict", json={"customer": customer}, timeout=30).json()
        r = post(server, columnar_request([customer]))
        assert probabilities(r) == [single["churn_probability"]]
        assert r.json()["outputs"][1]["data"] == [single["will_churn"]]


def _as_fp64(body: dict) -> dict:
    for tensor in body["inputs"]:
        if tensor["name"] in NUMERIC_FEATURES:
            tensor.update(datatype=FP64, data=[float(v) for v in tensor["data"]])
    return body


def _as_int64(body: dict) -> dict:  # every number that is integral, Balance 0.0 included
    for tensor in body["inputs"]:
        if tensor["name"] in NUMERIC_FEATURES and all(float(v).is_integer() for v in tensor["data"]):
            tensor.update(datatype=INT64, data=[int(v) for v in tensor["data"]])
    return body


def _n_by_1(nested: bool):
    def change(body: dict) -> dict:
        for tensor in body["inputs"]:
            tensor["shape"] = [tensor["shape"][0], 1]
            if nested:
                tensor["data"] = [[v] for v in tensor["data"]]
        return body

    return change


def _reversed(body: dict) -> dict:
    body["inputs"].reverse()
    return body


@pytest.mark.parametrize(
    "change",
    [_as_fp64, _as_int64, _n_by_1(nested=False), _n_by_1(nested=True), _reversed],
    ids=["numbers-as-FP64", "integral-numbers-as-INT64", "shape-Nx1-flat", "shape-Nx1-nested", "inputs-in-any-order"],
)
def test_the_same_columns_in_other_accepted_forms(server, customers, batch, change):
    rows = [{**c, "Balance": 0.0} if i % 2 else c for i, c in enumerate(customers[:40])]  # INT64 Balance too
    expected = probabilities(post(server, columnar_request(rows)))
    # (a 40-row batch may round the last bit differently from /predict_batch's 200 rows)
    assert expected[::2] == pytest.approx(batch["probability"][:40:2], rel=0, abs=1e-12)
    assert probabilities(post(server, change(columnar_request(rows)))) == expected


@pytest.mark.parametrize("change", [_as_fp64, _n_by_1(nested=True)], ids=["numbers-as-FP64", "shape-Nx1-nested"])
def test_a_single_row_in_other_accepted_forms(server, change):
    expected = probabilities(post(server, columnar_request([EXAMPLE_CUSTOMER])))
    assert probabilities(post(server, change(columnar_request([EXAMPLE_CUSTOMER])))) == expected


def test_requested_outputs_and_id(server, customers, batch):
    body = {"id": "req-7", **columnar_request(customers[:5]), "outputs": [{"name": OUTPUT_DECISION}]}
    r = post(server, body)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "req-7"
    assert r.json()["outputs"] == [
        {"name": OUTPUT_DECISION, "datatype": "BOOL", "shape": [5], "data": batch["decision"][:5]}
    ]
    both = [{"name": OUTPUT_DECISION}, {"name": OUTPUT_PROBABILITY, "parameters": {"binary_data": False}}]
    r = post(server, {**columnar_request(customers[:5]), "outputs": both})
    assert [o["name"] for o in r.json()["outputs"]] == [OUTPUT_DECISION, OUTPUT_PROBABILITY]  # as asked, JSON
    # another batch size than the batch's: ONNX Runtime may round the last bit differently
    np.testing.assert_allclose(r.json()["outputs"][1]["data"], batch["probability"][:5], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- binary tensor data


@pytest.mark.parametrize(
    "binary_inputs, parameters, outputs, binary_outputs",
    [
        (None, {}, None, set()),  # every input binary, JSON answers
        (None, {"binary_data_output": True}, None, {OUTPUT_PROBABILITY, OUTPUT_DECISION}),  # tritonclient's default
        ({"Age", "Geography", "Balance"}, {}, None, set()),  # binary and JSON inputs mixed
        (
            None,
            {"binary_data_output": True},
            [{"name": OUTPUT_DECISION, "parameters": {"binary_data": False}}, {"name": OUTPUT_PROBABILITY}],
            {OUTPUT_PROBABILITY},
        ),
    ],
    ids=["binary-inputs", "binary-outputs", "mixed-inputs", "per-output-choice"],
)
def test_binary_tensor_data_gives_predict_batchs_numbers(
    server, customers, batch, binary_inputs, parameters, outputs, binary_outputs
):
    request = {**columnar_request(customers), "parameters": parameters}
    if outputs is not None:
        request["outputs"] = outputs
    r = httpx.post(f"{server.url}{INFER}", **binary_request(request, binary_inputs), timeout=60)
    assert r.status_code == 200, r.text[:500]
    length = r.headers.get("inference-header-content-length")
    assert (length is not None) == bool(binary_outputs)
    assert r.headers["content-type"] == ("application/octet-stream" if binary_outputs else "application/json")
    answer = read_binary_response(r.content, length)
    by_name = {o["name"]: o for o in answer["outputs"]}
    assert {n for n, o in by_name.items() if "binary_data_size" in o.get("parameters", {})} == binary_outputs
    assert by_name[OUTPUT_PROBABILITY]["data"] == batch["probability"]
    if OUTPUT_DECISION in by_name:
        assert by_name[OUTPUT_DECISION]["data"] == batch["decision"]


def test_a_binary_single_row_gives_predicts_numbers(server, customers):
    for customer in customers[:5]:
        expected = httpx.post(f"{server.url}/predict", json={"customer": customer}, timeout=30).json()
        request = {**columnar_request([customer]), "parameters": {"binary_data_output": True}}
        r = httpx.post(f"{server.url}{INFER}", **binary_request(request), timeout=30)
        answer = read_binary_response(r.content, r.headers["inference-header-content-length"])
        assert [o["data"] for o in answer["outputs"]] == [[expected["churn_probability"]], [expected["will_churn"]]]


def test_bad_values_name_the_input_and_the_first_bad_row(server, customers):
    rows = copy.deepcopy(customers[:6])
    rows[3]["Age"], rows[5]["Age"], rows[4]["Geography"] = 12, 101, "Italy"
    r = post(server, columnar_request(rows))
    assert r.status_code == 400
    assert r.json() == {
        "error": "input 'Age', row 3: Input should be greater than or equal to 18 (allowed: an integer in [18, 100]) "
        "(and 1 more row); input 'Geography', row 4: Input should be 'France', 'Germany' or 'Spain' "
        "(allowed: one of 'France', 'Germany', 'Spain')"
    }


def test_the_row_limit_is_predict_batchs_and_a_full_request_is_scored(server, dataset):
    """BANKCHURN_MAX_BATCH_ROWS rows (10,000, ~1 MB of JSON: parsed and checked on the pool) give
    /predict_batch's numbers; one row more is refused before its data is looked at."""
    from serving.settings import Settings

    limit = Settings().max_batch_rows
    rows = [json_customer(r) for r in dataset[list(FEATURE_NAMES)].head(limit).to_dict(orient="records")]
    expected = httpx.post(f"{server.url}/predict_batch", json={"customers": rows}, timeout=120).json()
    assert probabilities(post(server, columnar_request(rows))) == [
        p["churn_probability"] for p in expected["predictions"]
    ]
    r = post(server, columnar_request([*rows, rows[0]]))
    assert r.status_code == 400 and f"at most {limit} rows per request" in r.json()["error"]


def test_v2_routes_are_counted_under_templated_labels(server):
    """Metrics labels stay few whatever paths clients send; errors reach the access log."""

    def count(route: str, status: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return metric(text, "bank_churn_http_requests_total", default=0.0, route=route, method="POST", status=status)

    label = f"{PREFIX}/models/{{model}}/infer"
    ok, missing = count(label, "200"), count(label, "404")
    assert probabilities(post(server, columnar_request([EXAMPLE_CUSTOMER])))
    for name in ("m1", "m2", "m3"):
        assert (
            post(server, columnar_request([EXAMPLE_CUSTOMER]), path=f"{PREFIX}/models/{name}/infer").status_code == 404
        )
    deadline = time.monotonic() + 5  # counted just after the response is sent
    while count(label, "404") < missing + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (count(label, "200"), count(label, "404")) == (ok + 1, missing + 3)
    text = httpx.get(f"{server.url}/metrics").text
    assert "/v2/models/m1" not in text
    assert "path=/v2/models/m3/infer) (status=404," in server.log()


def test_openapi_documents_the_v2_routes(server, trained):
    paths = httpx.get(f"{server.url}/docs.json").json()["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", MODEL, f"{MODEL}/ready", INFER} <= paths.keys()
    assert {f"{MODEL}/versions/{{version}}", f"{MODEL}/versions/{{version}}/infer"} <= paths.keys()
    example = paths[INFER]["post"]["requestBody"]["content"]["application/json"]["schema"]["example"]
    assert probabilities(post(server, example))


# ----------------------------------------------------------------------------- the single-row short way

_VALUE = st.one_of(
    st.integers(-5, 1200), st.floats(-10, 2e7), st.sampled_from([42.0, 0.5, True, None, "42", "France", "Male", [1]])
)
_CHANGES = st.lists(
    st.tuples(
        st.sampled_from(FEATURE_NAMES),
        st.sampled_from(["datatype", "shape", "data", "parameters", "nested", "twice", "drop", "name"]),
        st.sampled_from([FP64, INT64, BYTES, "FP32", [1], [True], [1, 1], [1.0], [2], {}, "Ages", None]),
        _VALUE,
    ),
    max_size=3,
)


def _valid(name: str):
    feature = BY_NAME[name]
    lo, hi = (0, 1) if feature.kind == "flag" else (int(feature.minimum), int(feature.maximum))
    if feature.kind == "float":
        return st.one_of(st.floats(lo, hi), st.integers(lo, hi))
    return st.one_of(st.integers(lo, hi), st.integers(lo, hi).map(float))  # FP64 data may carry integers


_ROW = st.fixed_dictionaries({n: _valid(n) for n in NUMERIC_FEATURES})


def test_the_usual_single_row_request_takes_the_short_way():
    body = columnar_request([EXAMPLE_CUSTOMER])
    expected = checked_columns(orjson.dumps(body), body["inputs"], None, tuple(OUTPUTS), 10).row
    assert expected is not None
    request = fast_single_row(orjson.dumps(body))
    assert request is not None and request.row == expected and request.outputs == tuple(OUTPUTS)
    # any order of the inputs, an id, chosen outputs, parameters
    shuffled = {
        "id": "7",
        "parameters": {"binary_data_output": False},
        "inputs": body["inputs"][::-1],
        "outputs": [{"name": OUTPUT_DECISION}],
    }
    request = fast_single_row(orjson.dumps(shuffled))
    assert request is not None and request.row == expected
    assert (request.id, request.outputs) == ("7", (OUTPUT_DECISION,))


@pytest.mark.parametrize(
    "change, status",
    [
        (lambda b: b["inputs"][1].update(data=["Italy"]), 400),  # a value out of the schema
        (lambda b: b.update(id=5), 400),  # a request field of the wrong type
        (lambda b: b.update(outputs=[{"name": "nope"}]), 400),
        (lambda b: b["inputs"].append(dict(b["inputs"][0])), 400),  # eleven inputs
        (lambda b: b["inputs"][3].update(data=[True]), 400),  # a boolean for a number
        (lambda b: b["inputs"][0].update(data=[619.0]), None),  # integral FP64: accepted the long way
    ],
)
def test_what_the_short_way_refuses_the_long_way_decides(change, status):
    body = columnar_request([EXAMPLE_CUSTOMER])
    body["inputs"][0]["datatype"] = FP64
    change(body)
    raw = orjson.dumps(body)
    try:
        fast = fast_single_row(raw)
    except BadRequest as exc:  # the outputs are worded the same either way
        fast = exc
    if status is None:
        assert fast is None and parse_request(raw, 10_000).row is not None
        return
    with pytest.raises(BadRequest) as exc:
        parse_request(raw, 10_000)
    assert fast is None or (isinstance(fast, BadRequest) and fast.message == exc.value.message)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(_ROW, st.dictionaries(st.sampled_from(NUMERIC_FEATURES), _VALUE, max_size=2), _CHANGES)
def test_the_short_way_for_one_row_accepts_only_what_the_columns_way_does(numbers, bad, changes):
    body = columnar_request([{**EXAMPLE_CUSTOMER, **numbers, **bad}])
    for tensor in body["inputs"]:  # integral floats go as FP64 (INT64 data with 42.0 takes the long way)
        if any(type(v) is float for v in tensor["data"]) and tensor["datatype"] == INT64:
            tensor["datatype"] = FP64
    inputs = body["inputs"]
    for name, what, option, value in changes:
        item = next((t for t in inputs if t.get("name") == name), None)
        if item is None:
            continue
        if what in ("datatype", "shape", "name"):
            item[what] = option
        elif what == "data":
            item["data"] = [value]
        elif what == "parameters":
            item["parameters"] = {}
        elif what == "nested":
            item["data"] = [item["data"]]
        elif what == "twice":
            inputs.append(dict(item))
        else:
            inputs.remove(item)
    raw = orjson.dumps(body)
    fast = fast_single_row(raw)  # the short way from the bytes (msgspec)
    try:
        checked = checked_columns(raw, inputs, None, tuple(OUTPUTS), 10_000)
    except BadRequest as exc:
        assert fast is None, (exc.message, fast)
        return
    if fast is not None:  # the same row, the same values and types
        assert checked.row == fast.row and [type(v) for v in checked.row] == [type(v) for v in fast.row]


# ----------------------------------------------------------------------------- readiness, in-process


@pytest.fixture
def service_instance(trained):
    """A BankChurn instance of this process (as a worker makes one) and its mounted /v2 app."""
    os.environ["BANKCHURN_MODEL_TAG"] = str(trained.model.tag)
    try:
        import service
    finally:
        del os.environ["BANKCHURN_MODEL_TAG"]
    before = dict(service.HOT_ROUTES.prefixes).get(PREFIX)
    svc = service.BankChurn()
    yield svc, service.HOT_ROUTES
    if before is not None:  # the instance mounted before this one (another test's) serves /v2 again
        service.HOT_ROUTES.mount(PREFIX, before)


def test_v2_readiness_is_the_services_and_false_once_shutdown_starts(service_instance):
    svc, table = service_instance

    async def app(scope, receive, send):  # the hot-route table alone, as in front of BentoML
        hit = table.match(scope)
        assert hit is not None, scope["path"]
        await table.serve(*hit, scope, receive, send)

    async def calls() -> list[tuple[int, dict]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
            answers = []
            for method, path, body in (
                ("GET", f"{PREFIX}/health/ready", None),
                ("GET", f"{MODEL}/ready", None),
                ("GET", f"{PREFIX}/health/live", None),
                ("POST", INFER, columnar_request([EXAMPLE_CUSTOMER])),
            ):
                r = await client.request(method, path, json=body)
                answers.append((r.status_code, r.json()))
            return answers

    ready = asyncio.run(calls())
    assert [a[0] for a in ready] == [200, 200, 200, 200]
    assert ready[0][1] == {"ready": True} and ready[1][1] == {"name": MODEL_NAME, "ready": True}
    asyncio.run(svc._shutdown())  # what BentoML runs when the worker starts to shut down
    assert svc.ready is False
    stopping = asyncio.run(calls())
    assert stopping[0] == (503, {"ready": False})
    assert stopping[1] == (503, {"name": MODEL_NAME, "ready": False})
    assert stopping[2] == (200, {"live": True})  # alive while it drains
    assert stopping[3][0] == 503 and "shutting down" in stopping[3][1]["error"]
