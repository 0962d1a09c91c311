"""The Open Inference Protocol over gRPC: a real `bentoml serve` answering inference.GRPCInferenceService
and grpc.health.v1 on its gRPC port, called with the service's own generated stubs (third-party
clients: test_v2_clients.py). Hostile messages get an error status and leave the server serving."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.servers import ROOT, metric, serving
from models.schema import EXAMPLE_CUSTOMER, json_customer
from models.store import MODEL_NAME
from serving.auth import digest
from serving.settings import Settings
from serving.v2 import grpc_predict_v2_pb2 as pb
from serving.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.v2.codec import (
    INPUT_DATATYPES,
    OUTPUT_DECISION,
    OUTPUT_PROBABILITY,
    PARAM_MODEL_VERSION,
    PARAM_SHARED_MEMORY_REGION,
    PARAM_THRESHOLD,
)

MAX_BODY = Settings().max_body_bytes
Code = grpc.StatusCode
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")


def test_the_generated_modules_are_what_make_protos_makes(tmp_path):
    """The committed stubs are exactly what `make protos` generates from the .proto."""
    (tmp_path / "serving" / "v2").mkdir(parents=True)
    shutil.copy(ROOT / "serving" / "v2" / "grpc_predict_v2.proto", tmp_path / "serving" / "v2")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=."]
    subprocess.run([*cmd, "serving/v2/grpc_predict_v2.proto"], cwd=tmp_path, check=True)
    for name in GENERATED:
        generated = (tmp_path / "serving" / "v2" / name).read_text()
        assert generated == (ROOT / "serving" / "v2" / name).read_text(), f"{name} is stale: run `make protos`"
    assert " ".join(cmd[1:]) in (ROOT / "Makefile").read_text()  # the command `make protos` runs


# ----------------------------------------------------------------------------- requests


def columns(rows: list[dict]) -> dict[str, list]:
    return {name: [r[name] for r in rows] for name in INPUT_DATATYPES}


def raw(datatype: str, values: list) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)
    return np.asarray(values, dtype="<i8" if datatype == "INT64" else "<f8").tobytes()


def infer_request(rows: list[dict], form: str = "raw", **fields: Any) -> pb.ModelInferRequest:
    """A ModelInferRequest for the rows: data as raw_input_contents (form 'raw') or typed contents."""
    request = pb.ModelInferRequest(model_name=MODEL_NAME, **fields)
    for name, values in columns(rows).items():
        datatype = INPUT_DATATYPES[name]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        if form == "raw":
            request.raw_input_contents.append(raw(datatype, values))
        elif datatype == "INT64":
            tensor.contents.int64_contents.extend(values)
        elif datatype == "FP64":
            tensor.contents.fp64_contents.extend(values)
        else:
            tensor.contents.bytes_contents.extend(v.encode() for v in values)
    return request


def outputs(response: pb.ModelInferResponse) -> dict[str, list]:
    dtypes = {"FP64": "<f8", "BOOL": "?"}
    return {
        o.name: np.frombuffer(data, dtype=dtypes[o.datatype]).tolist()
        for o, data in zip(response.outputs, response.raw_output_contents, strict=True)
    }


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def health_stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield health_pb2_grpc.HealthStub(channel)


@pytest.fixture(scope="module")
def customers(sample_rows) -> list[dict]:
    return [json_customer(r) for r in sample_rows]


@pytest.fixture(scope="module")
def batch(server, customers) -> dict:
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


def test_health_and_readiness(stub, health_stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
    for service in ("", "inference.GRPCInferenceService"):
        status = health_stub.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as exc:
        health_stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert exc.value.code() == Code.NOT_FOUND


def test_model_readiness_and_metadata(stub, trained):
    version = trained.model.tag.version
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME)).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME, version=version)).ready is True
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME))
    assert (metadata.name, list(metadata.versions)) == (MODEL_NAME, [version])
    assert [(i.name, i.datatype, list(i.shape)) for i in metadata.inputs] == [
        (name, datatype, [-1]) for name, datatype in INPUT_DATATYPES.items()
    ]
    assert [(o.name, o.datatype) for o in metadata.outputs] == [(OUTPUT_PROBABILITY, "FP64"), (OUTPUT_DECISION, "BOOL")]
    assert list(stub.ServerMetadata(pb.ServerMetadataRequest()).extensions) == ["binary_tensor_data"]
    for request in (pb.ModelReadyRequest(name="churn_v0"), pb.ModelReadyRequest(name=MODEL_NAME, version="v0")):
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelReady(request)
        assert exc.value.code() == Code.NOT_FOUND


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("form", ["raw", "typed"])
def test_infer_gives_predict_batchs_numbers(stub, customers, batch, trained, form):
    response = stub.ModelInfer(infer_request(customers, form, id="g-1"))
    assert (response.model_name, response.model_version, response.id) == (MODEL_NAME, trained.model.tag.version, "g-1")
    assert outputs(response) == {OUTPUT_PROBABILITY: batch["probability"], OUTPUT_DECISION: batch["decision"]}
    assert [(o.name, list(o.shape)) for o in response.outputs] == [
        (OUTPUT_PROBABILITY, [len(customers)]),
        (OUTPUT_DECISION, [len(customers)]),
    ]
    assert response.parameters[PARAM_MODEL_VERSION].string_param == batch["tag"]
    assert response.parameters[PARAM_THRESHOLD].double_param == batch["threshold"]


@pytest.mark.parametrize("form", ["raw", "typed"])
def test_single_rows_give_predicts_numbers(server, stub, customers, form):
    for customer in customers[:5]:
        expected = httpx.post(f"{server.url}/predict", json={"customer": customer}, timeout=30).json()
        got = outputs(stub.ModelInfer(infer_request([customer], form)))
        assert got == {OUTPUT_PROBABILITY: [expected["churn_probability"]], OUTPUT_DECISION: [expected["will_churn"]]}


def test_requested_outputs(stub, customers, batch):
    request = infer_request(
        customers[:3], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT_DECISION)]
    )
    assert outputs(stub.ModelInfer(request)) == {OUTPUT_DECISION: batch["decision"][:3]}


# ----------------------------------------------------------------------------- the short way (no server)


def _typed_value(name: str, value: Any, datatype: str | None = None) -> Callable[[pb.ModelInferRequest], None]:
    def change(request: pb.ModelInferRequest) -> None:
        tensor = next(t for t in request.inputs if t.name == name)
        tensor.datatype = datatype or tensor.datatype
        tensor.contents.Clear()
        field = {"INT64": "int64_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}[tensor.datatype]
        getattr(tensor.contents, field).append(value)

    return change


SHORT_WAY = [
    ("as-sent", "raw", lambda r: None),
    ("as-sent", "typed", lambda r: None),
    ("integral-fp64-for-an-integer", "typed", _typed_value("Age", 42.0, "FP64")),
    ("fractional-fp64-for-an-integer", "typed", _typed_value("Age", 42.5, "FP64")),
    ("int64-for-an-amount", "typed", _typed_value("Balance", 100, "INT64")),
    ("not-a-category", "typed", _typed_value("Geography", b"Italy")),
    ("out-of-range", "typed", _typed_value("Age", 12)),
    ("not-utf8", "typed", _typed_value("Gender", b"\xff")),
    ("shape-n-by-1", "raw", lambda r: [t.shape.append(1) for t in r.inputs]),
    ("an-input-twice", "raw", lambda r: _twice("Age")(r)),
    ("an-input-missing", "raw", lambda r: _drop("Age")(r)),
    ("raw-too-short", "raw", lambda r: _raw("Age", b"\0" * 4)(r)),
    ("bytes-length-wrong", "raw", lambda r: _raw("Gender", struct.pack("<I", 9) + b"Male")(r)),
]


@pytest.mark.parametrize("case, form, change", SHORT_WAY, ids=[f"{c[0]}-{c[1]}" for c in SHORT_WAY])
def test_the_short_way_for_one_row_gives_the_long_ways_row_or_steps_aside(case, form, change):
    from serving.v2.codec import BadRequest
    from serving.v2.grpc import decode_columns, fast_row

    request = infer_request([EXAMPLE_CUSTOMER], form)
    change(request)
    short = fast_row(request)
    try:
        long = decode_columns(request, 10_000).row
    except BadRequest:
        assert short is None, case
        return
    if short is not None:
        assert short == long and [type(v) for v in short] == [type(v) for v in long], case
    if case.startswith("as-sent"):
        assert short is not None


# ----------------------------------------------------------------------------- hostile messages


def _set(feature: str, /, **fields: Any) -> Callable[[pb.ModelInferRequest], None]:
    def change(request: pb.ModelInferRequest) -> None:
        tensor = next(t for t in request.inputs if t.name == feature)
        for key, value in fields.items():
            if key == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, key, value)

    return change


def _raw(name: str, data: bytes) -> Callable[[pb.ModelInferRequest], None]:
    def change(request: pb.ModelInferRequest) -> None:
        i = [t.name for t in request.inputs].index(name)
        request.raw_input_contents[i] = data

    return change


def _every_shape(shape: list[int]) -> Callable[[pb.ModelInferRequest], None]:
    def change(request: pb.ModelInferRequest) -> None:
        for tensor in request.inputs:
            del tensor.shape[:]
            tensor.shape.extend(shape)

    return change


def _drop(name: str) -> Callable[[pb.ModelInferRequest], None]:
    def change(request: pb.ModelInferRequest) -> None:
        i = [t.name for t in request.inputs].index(name)
        del request.inputs[i]
        if request.raw_input_contents:
            del request.raw_input_contents[i]

    return change


def _twice(name: str) -> Callable[[pb.ModelInferRequest], None]:
    def change(request: pb.ModelInferRequest) -> None:
        i = [t.name for t in request.inputs].index(name)
        request.inputs.add().CopyFrom(request.inputs[i])
        if request.raw_input_contents:
            request.raw_input_contents.append(request.raw_input_contents[i])

    return change


def _typed(change: Callable[[pb.ModelInferRequest], None]) -> Callable[[], pb.ModelInferRequest]:
    def build() -> pb.ModelInferRequest:
        request = infer_request([EXAMPLE_CUSTOMER] * 2, "typed")
        change(request)
        return request

    return build


def _raw_form(change: Callable[[pb.ModelInferRequest], None]) -> Callable[[], pb.ModelInferRequest]:
    def build() -> pb.ModelInferRequest:
        request = infer_request([EXAMPLE_CUSTOMER] * 2, "raw")
        change(request)
        return request

    return build


def _contents(name: str, **fields: list) -> Callable[[pb.ModelInferRequest], None]:
    def change(request: pb.ModelInferRequest) -> None:
        tensor = next(t for t in request.inputs if t.name == name)
        tensor.contents.Clear()
        for key, values in fields.items():
            getattr(tensor.contents, key).extend(values)

    return change


# (case, message builder, status code, substrings of the details)
HOSTILE_GRPC: list[tuple[str, Callable[[], pb.ModelInferRequest], grpc.StatusCode, tuple[str, ...]]] = [
    ("shape-10**15-rows", _raw_form(_every_shape([10**15])), Code.INVALID_ARGUMENT, ("at most 10000 rows",)),
    ("shape-2**62-rows-typed", _typed(_every_shape([2**62])), Code.INVALID_ARGUMENT, ("at most 10000 rows",)),
    ("shape-9000-rows-of-2", _raw_form(_every_shape([9000])), Code.INVALID_ARGUMENT, ("needs 72000",)),
    ("shape-negative", _typed(_set("Age", shape=[-1])), Code.INVALID_ARGUMENT, ("is not a column's",)),
    ("shape-3-d", _typed(_set("Age", shape=[2, 1, 1])), Code.INVALID_ARGUMENT, ("is not a column's",)),
    ("shape-zero-rows", _typed(_every_shape([0])), Code.INVALID_ARGUMENT, ("at least 1 row",)),
    ("datatype-FP32", _typed(_set("Balance", datatype="FP32")), Code.INVALID_ARGUMENT, ("'FP32' is not accepted",)),
    ("datatype-BYTES-for-a-number", _raw_form(_set("Age", datatype="BYTES")), Code.INVALID_ARGUMENT, ("allowed",)),
    (
        "int64-declared-fp64-contents",
        _typed(_contents("Age", fp64_contents=[42.0, 42.0])),
        Code.INVALID_ARGUMENT,
        ("INT64 data goes in contents.int64_contents, found fp64_contents",),
    ),
    (
        "contents-fewer-than-the-shape",
        _typed(_contents("Age", int64_contents=[42])),
        Code.INVALID_ARGUMENT,
        ("needs 2 values, contents has 1",),
    ),
    (
        "raw-not-the-shape",
        _raw_form(_raw("Age", b"\0" * 12)),
        Code.INVALID_ARGUMENT,
        ("12 bytes of INT64 data, but shape [2] needs 16",),
    ),
    (
        "raw-bytes-element-past-its-tensor",
        _raw_form(_raw("Geography", struct.pack("<I", 10**9) + b"France")),
        Code.INVALID_ARGUMENT,
        ("runs past the end",),
    ),
    (
        "raw-bytes-not-utf8",
        _raw_form(_raw("Gender", struct.pack("<I", 2) + b"\xff\xfe" + struct.pack("<I", 4) + b"Male")),
        Code.INVALID_ARGUMENT,
        ("UTF-8",),
    ),
    (
        "raw-count-not-the-inputs",
        _raw_form(lambda r: r.raw_input_contents.pop()),
        Code.INVALID_ARGUMENT,
        ("raw_input_contents has 9 entries for 10 inputs",),
    ),
    (
        "raw-and-contents",
        _raw_form(_contents("Age", int64_contents=[42, 42])),
        Code.INVALID_ARGUMENT,
        ("both contents and raw_input_contents",),
    ),
    ("missing-input", _raw_form(_drop("Tenure")), Code.INVALID_ARGUMENT, ("missing input(s): Tenure",)),
    ("input-twice", _raw_form(_twice("Age")), Code.INVALID_ARGUMENT, ("input 'Age' is given twice",)),
    (
        "1-MB-input-name",
        _typed(_set("Age", name="A" * 2**20)),
        Code.INVALID_ARGUMENT,
        ("unknown input 'AAAA",),
    ),
    (
        "no-inputs",
        lambda: pb.ModelInferRequest(model_name=MODEL_NAME),
        Code.INVALID_ARGUMENT,
        ("one input per feature",),
    ),
    (
        "a-bad-value",
        _typed(_contents("Age", int64_contents=[42, 12])),
        Code.INVALID_ARGUMENT,
        ("input 'Age', row 1: Input should be greater than or equal to 18 (allowed: an integer in [18, 100])",),
    ),
    (
        "unknown-output",
        _typed(lambda r: r.outputs.add(name="p")),
        Code.INVALID_ARGUMENT,
        ("unknown output 'p'",),
    ),
    (
        "shared-memory",
        _typed(lambda r: r.parameters[PARAM_SHARED_MEMORY_REGION].MergeFrom(pb.InferParameter(string_param="r"))),
        Code.INVALID_ARGUMENT,
        ("shared-memory extension",),
    ),
    ("unknown-model", _typed(lambda r: setattr(r, "model_name", "churn_v0")), Code.NOT_FOUND, ("'churn_v0'",)),
    ("unknown-version", _typed(lambda r: setattr(r, "model_version", "v0")), Code.NOT_FOUND, ("'v0'",)),
    (
        "message-over-the-body-limit",
        _typed(_contents("Geography", bytes_contents=[b"a" * (MAX_BODY + 1024), b"France"])),
        Code.RESOURCE_EXHAUSTED,
        (),
    ),
]


@pytest.mark.parametrize("case, build, code, says", HOSTILE_GRPC, ids=[c[0] for c in HOSTILE_GRPC])
def test_hostile_messages_get_an_error_status_and_the_server_keeps_serving(stub, case, build, code, says):
    request = build()
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(request, timeout=30)
    assert exc.value.code() == code, exc.value.details()
    for text in says:
        assert text in exc.value.details()
    assert len(exc.value.details()) < 2000  # a name or value a client sent is quoted cut short
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
    assert outputs(stub.ModelInfer(infer_request([EXAMPLE_CUSTOMER])))[OUTPUT_DECISION] in ([True], [False])


def test_grpc_calls_are_counted_by_method_and_code(server, stub):
    def count(method: str, code: str) -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return metric(text, "bank_churn_grpc_requests_total", 0, method=method, code=code)

    infer = "/inference.GRPCInferenceService/ModelInfer"
    before = count(infer, "OK"), count(infer, "NOT_FOUND")
    stub.ModelInfer(infer_request([EXAMPLE_CUSTOMER]))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(pb.ModelInferRequest(model_name="churn_v0"))
    assert (count(infer, "OK"), count(infer, "NOT_FOUND")) == (before[0] + 1, before[1] + 1)


# ----------------------------------------------------------------------------- API keys


@pytest.fixture(scope="module")
def keyed_server(trained, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"crm:predict:{digest('crm-key')}\nbatch:jobs:{digest('jobs-key')}\n")
    env = {"BANKCHURN_MODEL_TAG": str(trained.model.tag), "BANKCHURN_API_KEYS_FILE": str(keys)}
    with serving(env=env) as proc:
        yield proc


@pytest.mark.integration
def test_api_keys_on_grpc(keyed_server):
    with grpc.insecure_channel(keyed_server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # probes stay open: liveness, readiness, grpc.health.v1
        assert stub.ServerLive(pb.ServerLiveRequest()).live is True
        assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        request = infer_request([EXAMPLE_CUSTOMER])
        for metadata, code in (
            ((), Code.UNAUTHENTICATED),
            ((("authorization", "Bearer wrong-key"),), Code.UNAUTHENTICATED),
            ((("authorization", "Bearer jobs-key"),), Code.PERMISSION_DENIED),
        ):
            for call, message in ((stub.ModelInfer, request), (stub.ModelMetadata, pb.ModelMetadataRequest())):
                with pytest.raises(grpc.RpcError) as exc:
                    call(message, metadata=metadata)
                assert exc.value.code() == code, (metadata, exc.value.details())
        assert "lacks the 'predict' scope" in exc.value.details()
        for metadata in ((("authorization", "Bearer crm-key"),), (("x-api-key", "crm-key"),)):
            assert outputs(stub.ModelInfer(request, metadata=metadata))[OUTPUT_DECISION] in ([True], [False])
