"""The prediction log and request ids through real `bentoml serve` processes: every route
logs its rows with the request id it answered with, a job logs only the features and the
CustomerId, the Redis stream keeps its caps, a sink outage fails and slows no request (the
drops are counted), and two replicas' records land in one shared stream."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import httpx
import pytest

from harness.data import customers_csv, submit_job
from harness.fleet import Fleet, RedisServer, wait_for_job
from harness.servers import metric, serving
from models.schema import EXAMPLE_CUSTOMER, FEATURE_NAMES
from serving.engine import V2_GRPC
from serving.predictionlog.records import PredictionRow
from serving.predictionlog.sinks import RedisStreamSink, iso_time, read_files, read_stream, redis_client
from serving.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.test_v2_grpc import infer_request, outputs

pytestmark = pytest.mark.integration  # real `bentoml serve`, redis-server, haproxy

CUSTOMER = EXAMPLE_CUSTOMER
REQUEST_ID = "x-request-id"
LOGGED_KEYS = {"time", "model_version", "route", "request_id", "job_id", "row", "CustomerId", *FEATURE_NAMES}
LOGGED_KEYS |= {"churn_probability", "will_churn"}


def wait_for_rows(read, n: int, timeout: float = 20) -> list:
    deadline = time.monotonic() + timeout
    while True:
        records = [r for batch in read() for r in batch]
        if len(records) >= n or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


@pytest.fixture(scope="module")
def logging_server(trained, tmp_path_factory):
    directory = tmp_path_factory.mktemp("prediction-log")
    env = {"BANKCHURN_MODEL_TAG": str(trained.model.tag), "BANKCHURN_PREDICTION_LOG_DIR": str(directory)}
    with serving(env=env) as proc:
        proc.log_dir = directory
        yield proc


def v2_body(rows: list[dict]) -> dict:
    inputs = []
    for name in FEATURE_NAMES:
        values = [r[name] for r in rows]
        datatype = "BYTES" if isinstance(values[0], str) else "FP64" if isinstance(values[0], float) else "INT64"
        inputs.append({"name": name, "shape": [len(rows)], "datatype": datatype, "data": values})
    return {"inputs": inputs}


def test_every_route_logs_its_rows_with_its_request_id(logging_server, trained):
    url, older = logging_server.url, {**CUSTOMER, "Age": 70}
    calls = [
        ("predict", "/predict", {"customer": CUSTOMER}),
        ("explained", "/predict", {"customer": older, "explain": True}),
        ("batch", "/predict_batch", {"customers": [CUSTOMER, older, CUSTOMER]}),
        ("explain", "/explain", {"customer": older}),
        ("v2-one", "/v2/models/bank_churn/infer", v2_body([CUSTOMER])),
        ("v2-many", "/v2/models/bank_churn/infer", v2_body([CUSTOMER, older])),
        ("refused", "/predict", {"customer": {**CUSTOMER, "Age": 12}}),
    ]
    answers = {}
    for rid, path, body in calls:
        r = httpx.post(f"{url}{path}", json=body, headers={REQUEST_ID: rid}, timeout=30)
        assert r.headers[REQUEST_ID] == rid
        answers[rid] = r
    assert answers["refused"].status_code == 400
    upload = (
        b"CustomerId,Surname,Secret,CreditScore,Geography,Gender,Age,Tenure,Balance,NumOfProducts,HasCrCard,"
        b"IsActiveMember,EstimatedSalary,Exited\n"
        b"15634602,Hargrave,do-not-log,619,France,Female,42,2,0,1,1,1,101348.88,1\n"
        b"15647311,Hill,do-not-log,608,Spain,Female,41,1,83807.86,1,0,1,112542.58,0\n"
        b"15619304,Onio,do-not-log,502,France,Female,12,8,159660.8,3,1,0,113931.57,1\n"
    )
    job = submit_job(url, upload).json()
    # A job's rows are logged under its ref (as in the server's log), never its id: the id is
    # the key to its results.
    ref = wait_for_job(url, job["job_id"])["ref"]
    with grpc.insecure_channel(logging_server.grpc_address) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        # the client's x-request-id metadata, as X-Request-Id over HTTP; returned in the trailers
        answer, call = infer.with_call(infer_request([CUSTOMER, older, CUSTOMER]), metadata=[("x-request-id", "grpc")])
        assert dict(call.trailing_metadata())["x-request-id"] == "grpc"
        # none sent (or a malformed one: spaces around it, over 128 characters): a new id, returned
        _, call = infer.with_call(infer_request([CUSTOMER]), metadata=[("x-request-id", " spaced ")])
        generated = dict(call.trailing_metadata())["x-request-id"]
        assert len(generated) == 32 and generated != " spaced "
        _, call = infer.with_call(infer_request([CUSTOMER]), metadata=[("x-request-id", "x" * 129)])
        too_long = dict(call.trailing_metadata())["x-request-id"]
        assert len(too_long) == 32
        # a refused call carries its id too (support can find it in the server's log)
        with pytest.raises(grpc.RpcError) as refused:
            infer(infer_request([{**CUSTOMER, "Age": 12}]), metadata=[("x-request-id", "grpc-refused")])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(refused.value.trailing_metadata())["x-request-id"] == "grpc-refused"
    grpc_probabilities = outputs(answer)["churn_probability"]

    records = wait_for_rows(lambda: read_files(logging_server.log_dir, since=0), 1 + 1 + 3 + 1 + 1 + 2 + 2 + 3 + 1 + 1)
    by_id: dict = {}
    for r in records:
        by_id.setdefault(r.request_id or r.job_id, []).append(r)
    grpc_rows = by_id.pop("grpc")
    assert [(r.route, r.row, r.Age) for r in grpc_rows] == [(V2_GRPC, i, a) for i, a in ((1, 42), (2, 70), (3, 42))]
    assert [r.churn_probability for r in grpc_rows] == grpc_probabilities
    assert [(r.route, r.Age) for r in by_id.pop(generated) + by_id.pop(too_long)] == [(V2_GRPC, 42)] * 2
    assert set(by_id) == {"predict", "explained", "batch", "explain", "v2-one", "v2-many", ref}
    assert [(r.route, r.row) for r in by_id["predict"]] == [("/predict", None)]
    assert by_id["predict"][0].churn_probability == answers["predict"].json()["churn_probability"]
    assert len(by_id["explained"]) == 1, "a /predict with explain logs its row once"
    batch = answers["batch"].json()["predictions"]
    assert [(r.route, r.row, r.Age) for r in by_id["batch"]] == [
        ("/predict_batch", i, a) for i, a in ((1, 42), (2, 70), (3, 42))
    ]
    assert [r.churn_probability for r in by_id["batch"]] == [p["churn_probability"] for p in batch]
    assert [r.will_churn for r in by_id["batch"]] == [p["will_churn"] for p in batch]
    assert by_id["explain"][0].route == "/explain" and by_id["explain"][0].Age == 70
    assert [r.route for r in by_id["v2-one"] + by_id["v2-many"]] == ["/v2/models/bank_churn/infer"] * 3
    assert [r.row for r in by_id["v2-many"]] == [1, 2]
    job_rows = by_id[ref]
    assert [(r.route, r.row, r.CustomerId, r.request_id) for r in job_rows] == [
        ("/jobs", 1, "15634602", None),
        ("/jobs", 2, "15647311", None),
    ], "a job logs its scored rows (not the refused one) with their data row and CustomerId"
    assert {r.model_version for r in records} == {str(trained.model.tag)}
    raw = b"".join(p.read_bytes() for p in logging_server.log_dir.glob("predictions-*.jsonl"))
    assert b"Hargrave" not in raw and b"do-not-log" not in raw and b"Exited" not in raw
    import orjson

    assert {key for line in raw.splitlines() for key in orjson.loads(line)} <= LOGGED_KEYS
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "bank_churn_prediction_log_written_rows_total") >= len(records)
    assert metric(text, "bank_churn_prediction_log_sink_up") == 1


# (method, path, body): every kind of route answers with the request's id
ROUTES = [
    ("POST", "/predict", {"customer": CUSTOMER}),
    ("POST", "/predict", {"customer": {**CUSTOMER, "Age": 12}}),  # a 400 from the hot route
    ("POST", "/predict_batch", {"customers": [CUSTOMER]}),
    ("POST", "/predict_batch", {"customers": []}),  # a 400 from BentoML's validation
    ("POST", "/explain", {"customer": CUSTOMER}),
    ("POST", "/model_card", {}),
    ("POST", "/v2/models/bank_churn/infer", v2_body([CUSTOMER])),
    ("GET", "/v2/health/ready", None),
    ("GET", "/jobs/no-such-job", None),
    ("GET", "/livez", None),
    ("GET", "/readyz", None),
    ("GET", "/metrics", None),
    ("GET", "/docs.json", None),
    ("GET", "/no/such/path", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_returns_the_request_id(server, method, path, body):
    sent = httpx.request(method, f"{server.url}{path}", json=body, headers={REQUEST_ID: "client-id-42"}, timeout=30)
    assert sent.headers.get(REQUEST_ID) == "client-id-42"
    made = httpx.request(method, f"{server.url}{path}", json=body, timeout=30)
    assert len(made.headers.get(REQUEST_ID, "")) == 32
    replaced = httpx.request(method, f"{server.url}{path}", json=body, headers={REQUEST_ID: "x" * 500}, timeout=30)
    assert replaced.status_code == made.status_code and len(replaced.headers[REQUEST_ID]) == 32
    assert len(replaced.headers.get_list(REQUEST_ID)) == 1


# ---------------------------------------------------------------- the Redis stream sink


@pytest.fixture(scope="module")
def redis_sink_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-log")).start()
    yield server
    server.stop()


def row(t: float, request_id: str) -> PredictionRow:
    return PredictionRow(
        iso_time(t), "bank_churn:v", "/predict", request_id, None, None, None, *CUSTOMER.values(), 0.5, True
    )


def test_the_stream_is_capped_by_rows_and_by_age_and_read_by_window(redis_sink_server):
    client = redis_client(redis_sink_server.url)
    sink = RedisStreamSink(client, "test:capped", retention_s=3600, max_rows=1000)
    now = time.time()
    for k in range(10):
        sink.write([row(now, f"r{k}-{i}") for i in range(500)])
    length = client.xlen("test:capped")
    assert 1000 <= length <= 1200, f"MAXLEN ~ keeps about max_rows, not {length}"
    latest = [r.request_id for batch in read_stream(client, "test:capped", since=now - 60) for r in batch]
    assert latest[-1] == "r9-499" and len(latest) == length
    aged = RedisStreamSink(client, "test:aged", retention_s=0.5, max_rows=100_000)
    aged.write([row(now, f"old-{i}") for i in range(300)])
    time.sleep(1.0)
    aged.write([row(time.time(), "new")])
    left = [r.request_id for batch in read_stream(client, "test:aged", since=0) for r in batch]
    assert "new" in left and len(left) < 301, "entries past the retention are trimmed (a node at a time)"
    assert [r.request_id for batch in read_stream(client, "test:aged", since=time.time() - 0.3) for r in batch] == [
        "new"
    ]
    client.close()


@pytest.fixture(scope="module")
def fleet(trained, tmp_path_factory):
    env = {"BANKCHURN_PREDICTION_LOG_SINK": "redis"}
    with Fleet(tmp_path_factory.mktemp("fleet-log"), str(trained.model.tag), replicas=2, env=env) as f:
        yield f


def stream_rows(fleet, since: float) -> list[PredictionRow]:
    client = redis_client(fleet.redis.url)
    try:
        return [r for batch in read_stream(client, "bank_churn:predictions", since) for r in batch]
    finally:
        client.close()


def test_two_replicas_records_reach_the_shared_stream(fleet):
    since = time.time() - 1
    for slot, replica in enumerate(fleet.replicas):
        r = httpx.post(f"{replica.url}/predict", json={"customer": CUSTOMER}, headers={REQUEST_ID: f"replica-{slot}"})
        assert r.status_code == 200
    job = submit_job(fleet.url, customers_csv(50)).json()
    ref = wait_for_job(fleet.url, job["job_id"])["ref"]
    records = wait_for_rows(lambda: [stream_rows(fleet, since)], 52)
    assert {r.request_id for r in records} >= {"replica-0", "replica-1"}
    assert sorted(r.row for r in records if r.job_id == ref) == list(range(1, 51))


def test_a_sink_outage_fails_and_slows_no_request_and_the_drops_are_counted(fleet):
    def dropped() -> float:
        return sum(
            metric(httpx.get(f"{r.url}/metrics").text, "bank_churn_prediction_log_dropped_rows_total", 0)
            for r in fleet.replicas
        )

    before = dropped()
    latencies: list[float] = []
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=fleet.url, timeout=30) as client:
            while not stop.is_set():
                t = time.perf_counter()
                statuses.append(client.post("/predict", json={"customer": CUSTOMER}).status_code)
                latencies.append(time.perf_counter() - t)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(1)
        fleet.redis.proc.send_signal(signal.SIGSTOP)  # a hung sink: connections open, no answers
        time.sleep(8)
        fleet.redis.proc.send_signal(signal.SIGCONT)
        time.sleep(1)
        fleet.redis.stop()  # a sink that is down: connections refused
        time.sleep(3)
    finally:
        stop.set()
        thread.join()
        if fleet.redis.proc.poll() is not None:
            fleet.redis.start()
    assert len(statuses) > 100 and set(statuses) == {200}
    assert max(latencies) < 2.0, f"a request waited on the sink: {max(latencies):.2f} s"
    assert dropped() > before
    # The log resumes once the sink is back (rows in the writer's back-off second are dropped too).
    since, deadline = time.time() - 1, time.monotonic() + 30
    while not any(r.request_id == "after" for r in stream_rows(fleet, since)):
        assert time.monotonic() < deadline, "the log did not resume after the sink came back"
        httpx.post(f"{fleet.replicas[0].url}/predict", json={"customer": CUSTOMER}, headers={REQUEST_ID: "after"})
        time.sleep(0.5)
