"""Hostile input against a real `bentoml serve`: property-based fuzzing of every served API
against its own OpenAPI document (schemathesis), then a table of hostile payloads, raw-socket
HTTP abuse and hostile CSV scoring jobs.

The rule: nothing a client sends may produce a 5xx or kill the process; bad input gets a
clear 4xx whose `error` names the field and what is allowed. Afterwards the service still
answers exactly as before. The tests at the end guard issues the fuzzing found (lax
`explain`, ignored unknown fields, oversized CSV cells, a non-UTF-8 Content-Type).
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from prometheus_client.parser import text_string_to_metric_families

from harness.fleet import wait_for_job
from harness.v2 import binary_body, binary_parts, raw_tensor
from models.schema import EXAMPLE_CUSTOMER, FEATURE_NAMES
from models.store import MODEL_NAME
from serving.settings import Settings
from serving.v2.codec import (
    CLASSIFICATION_UNSUPPORTED,
    OUTPUT_PROBABILITY,
    PARAM_BINARY_DATA_SIZE,
    PARAM_CLASSIFICATION,
    PARAM_SHARED_MEMORY_REGION,
    SHARED_MEMORY_UNSUPPORTED,
    columnar_request,
)

pytestmark = pytest.mark.integration  # real `bentoml serve` processes

CUSTOMER = EXAMPLE_CUSTOMER
JSON = {"content-type": "application/json"}
MAX_BODY = Settings().max_body_bytes  # the session server reads the same environment
MAX_ROWS = Settings().max_batch_rows
V2_INFER = f"/v2/models/{MODEL_NAME}/infer"
MiB = 1024 * 1024


class KnownIssue(AssertionError):
    """A problem the fuzzing once found has come back (each test below names it)."""


# ----------------------------------------------------------------------------- helpers


def five_xx(server) -> float:
    """5xx responses the server has recorded, over every endpoint (from /metrics): BentoML's
    routes and the hot routes in front of them (/predict, /v2), which count their own."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if (sample.name.endswith("_request_total") and sample.labels.get("http_response_code", "").startswith("5"))
        # the hot routes (POST /predict, /jobs, /v2) count their answers themselves
        or (sample.name == "bank_churn_http_requests_total" and sample.labels.get("status", "").startswith("5"))
    )


def unexpected_exceptions(log: str) -> list[str]:
    """The exception line of every traceback in a server log excerpt, except pydantic's
    ValidationError (BentoML logs each 400 validation error with its traceback)."""
    found = []
    for record in re.split(r"\n(?=\d{4}-\d\d-\d\dT)", log):
        if "Traceback (most recent call last)" not in record:
            continue
        lines = record.splitlines()
        last_frame = max((i for i, line in enumerate(lines) if line.startswith('  File "')), default=0)
        rest = [line for line in lines[last_frame + 1 :] if line and not line.startswith("    ")]
        exception = rest[0] if rest else "?"
        if not exception.startswith("pydantic_core._pydantic_core.ValidationError"):
            found.append(exception)
    return found


def probability(server) -> float:
    r = httpx.post(f"{server.url}/predict", json={"customer": CUSTOMER}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["churn_probability"]


def as_json(obj: Any, **dumps: Any) -> dict[str, Any]:
    return {"content": json.dumps(obj, **dumps).encode(), "headers": JSON}


def raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": JSON}


def error_of(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text[:300]
    error = r.json()["error"]
    assert isinstance(error, str) and error, r.text[:300]
    return error


@pytest.fixture(scope="module", autouse=True)
def before(server) -> dict[str, Any]:
    """What the server looked like before this module's hostile traffic."""
    return {"log_offset": len(server.log()), "five_xx": five_xx(server), "probability": probability(server)}


# ----------------------------------------------------------------------------- fuzzing

# Every operation of the served /docs.json through schemathesis' three generating phases
# (examples, coverage = boundary and negative values, fuzzing = random and schema-violating),
# deterministic and bounded: ~900 requests in ~15 s. Checks: "no server error" plus a
# clear-4xx check of our own. schemathesis' conformance checks are off: they trip over
# quirks of the OpenAPI 3.0 document BentoML 1.4 generates (400 bodies documented as
# InvalidArgument, TaskStatusResponse requiring fields /submit does not return, task inputs
# validated after /submit answers, cancel unsupported by the local server).
# (schemathesis' pytest plugin, `schemathesis.pytest.from_fixture`, does not run under
# pytest 9: it sets `Function._nodeid`. The engine below is what its CLI runs.)
FUZZ_CONFIG = {
    "seed": 20260522,
    "workers": 1,
    "suppress-health-check": ["all"],
    "request-timeout": 60,
    "warnings": False,
    "cache": {"enabled": False},  # no .schemathesis/ directory in the repository
    "generation": {"mode": "all", "max-examples": 40, "deterministic": True, "no-shrink": True, "database": "none"},
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": False},
    },
    "checks": {"enabled": False, "not_a_server_error": {"enabled": True}, "clear_client_error": {"enabled": True}},
}


@schemathesis.check
def clear_client_error(ctx, response, case) -> bool | None:
    """A 400/413/415/422 carries a JSON body with a non-empty `error` message."""
    if response.status_code in (400, 413, 415, 422):
        body = json.loads(response.content)
        if isinstance(body, list) and len(body) == 1:
            body = body[0]
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], (
            f"{response.status_code} without a clear `error`: {response.content[:300]!r}"
        )
    return None


def test_fuzzing_every_api_never_gives_a_server_error(server):
    from schemathesis.engine import Status, events, from_schema

    config = schemathesis.Config.from_dict(FUZZ_CONFIG)
    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json", config=config, timeout=30)
    problems: list[str] = []
    statuses: dict[int, int] = {}
    tested: set[str] = set()
    finished = None
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            tested.add(event.recorder.label)
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    statuses[interaction.response.status_code] = statuses.get(interaction.response.status_code, 0) + 1
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info
                        problems.append(
                            f"[{event.phase}] {event.recorder.label}: {check.name}: {failure.failure.title}: "
                            f"{failure.failure.message[:300]}\n    {failure.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            problems.append(f"[{event.phase}] {event.label}: error: {event.info.format()[:1000]}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert not problems, f"{len(problems)} fuzzing failures:\n" + "\n".join(sorted(set(problems))[:20])
    assert finished is not None and finished.stop_reason == "completed"
    assert {"POST /predict", "POST /predict_batch", "POST /explain", "POST /model_card"} <= tested
    assert {"POST /jobs", "GET /jobs/{job_id}", "GET /jobs/{job_id}/result", "DELETE /jobs/{job_id}"} <= tested
    assert {"GET /v2", "GET /v2/health/ready", f"GET /v2/models/{MODEL_NAME}", f"POST {V2_INFER}"} <= tested
    assert f"POST /v2/models/{MODEL_NAME}/versions/{{version}}/infer" in tested
    assert not [code for code in statuses if code >= 500], statuses
    assert sum(statuses.values()) >= 500, f"the fuzzer sent too few requests: {statuses}"
    assert statuses.get(200, 0) >= 50 and statuses.get(400, 0) >= 100, statuses  # both valid and invalid input


# ----------------------------------------------------------------------------- hostile payloads

DEEP = 100_000


def _multipart(body: bytes, boundary: str | None = "b0undary") -> dict[str, Any]:
    ct = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    return {"content": body, "headers": {"content-type": ct}}


# ----------------------------------------------------------------------------- hostile V2 bodies


def v2(change: Callable[[dict], Any] = lambda body: None, rows: int = 1, **dumps: Any) -> dict[str, Any]:
    """An Open Inference Protocol request for `rows` customers, changed by `change`, as JSON."""
    body = columnar_request([CUSTOMER] * rows)
    change(body)
    return as_json(body, **dumps)


def tensor(body: dict, name: str) -> dict:
    return next(t for t in body["inputs"] if t["name"] == name)


def setting(feature: str, /, **fields: Any) -> Callable[[dict], None]:
    return lambda body: tensor(body, feature).update(fields)


def every_input(**fields: Any) -> Callable[[dict], None]:
    return lambda body: [t.update(fields) for t in body["inputs"]]


def _row_3_of(name: str, value: Any) -> Callable[[dict], None]:
    def change(body: dict) -> None:
        tensor(body, name)["data"][3] = value

    return change


def binary(
    change: Callable[[dict, list[bytes]], Any] = lambda head, blobs: None,
    rows: int = 2,
    header_length: int | str | None = None,
    names: set[str] | None = None,
) -> dict[str, Any]:
    """A request in the binary tensor data extension's framing (every input binary, or `names`),
    its JSON header and binary parts changed by `change`."""
    head, blobs = binary_parts(columnar_request([CUSTOMER] * rows), names)
    change(head, blobs)
    return binary_body(head, blobs, header_length)


def _blob(name: str, blob: bytes) -> Callable[[dict, list[bytes]], None]:
    """Replace an input's bytes (its binary_data_size follows unless `size` says otherwise)."""

    def change(head: dict, blobs: list[bytes]) -> None:
        i = [t["name"] for t in head["inputs"]].index(name)
        blobs[i] = blob
        head["inputs"][i]["parameters"][PARAM_BINARY_DATA_SIZE] = len(blob)

    return change


def _size(name: str, size: Any) -> Callable[[dict, list[bytes]], None]:
    return lambda head, blobs: tensor(head, name)["parameters"].update({PARAM_BINARY_DATA_SIZE: size})


# (case, request kwargs, status, substrings of `error`): the binary extension's framing, lengths and values
HOSTILE_BINARY: list[tuple[str, Callable[[], dict[str, Any]], int, tuple[str, ...]]] = [
    ("binary-size-past-the-body", lambda: binary(_size("EstimatedSalary", 10**9)), 400, ("runs past the end",)),
    ("binary-size-negative", lambda: binary(_size("Age", -8)), 400, ("must be a byte count",)),
    ("binary-size-a-string", lambda: binary(_size("Age", "16")), 400, ("must be a byte count",)),
    ("binary-size-a-boolean", lambda: binary(_size("Age", True)), 400, ("must be a byte count",)),
    ("binary-size-2**64", lambda: binary(_size("Age", 2**64)), 400, ("must be a byte count",)),
    ("binary-size-too-small", lambda: binary(_size("CreditScore", 8)), 400, ("bytes after the last binary input",)),
    ("binary-bytes-after-the-inputs", lambda: binary(lambda h, b: b.append(b"\0" * 7)), 400, ("7 bytes after",)),
    ("header-length-past-the-body", lambda: binary(header_length=10**9), 400, ("longer than the body",)),
    ("header-length-negative", lambda: binary(header_length=-5), 400, ("must be a byte count",)),
    ("header-length-not-a-number", lambda: binary(header_length="12abc"), 400, ("must be a byte count",)),
    ("header-length-2**70", lambda: binary(header_length=2**70), 400, ("must be a byte count",)),
    ("header-length-zero", lambda: binary(header_length=0), 400, ("empty body",)),
    ("header-length-cuts-the-json", lambda: binary(header_length=20), 400, ("invalid JSON",)),
    (
        "int64-bytes-not-the-shape",
        lambda: binary(_blob("Age", raw_tensor("INT64", [42])[:-2])),
        400,
        ("'Age': 6 bytes of INT64 data, but shape [2] needs 16",),
    ),
    (
        "shape-claims-10**12-rows-of-16-bytes",
        lambda: binary(lambda h, b: [t.update(shape=[10**12]) for t in h["inputs"]]),
        400,
        ("at most 10000 rows",),
    ),
    (
        "shape-claims-9000-rows-of-16-bytes",
        lambda: binary(lambda h, b: [t.update(shape=[9000]) for t in h["inputs"]]),
        400,
        ("bytes of", "needs 72000"),
    ),
    (
        "bytes-element-past-its-tensor",
        lambda: binary(_blob("Geography", struct.pack("<I", 2**32 - 1) + b"France")),
        400,
        ("'Geography', row 0: a BYTES element of 4294967295 bytes runs past",),
    ),
    (
        "bytes-element-length-cut",
        lambda: binary(_blob("Gender", raw_tensor("BYTES", ["Male"]) + b"\x04\0")),
        400,
        ("'Gender': BYTES data ends after 1 elements, shape [2] needs 2",),
    ),
    (
        "bytes-more-elements-than-the-shape",
        lambda: binary(_blob("Gender", raw_tensor("BYTES", ["Male"] * 3))),
        400,
        ("bytes of BYTES data after the 2 elements",),
    ),
    (
        "bytes-not-utf8",
        lambda: binary(_blob("Gender", raw_tensor("BYTES", [b"\xff\xfe", b"Male"]))),
        400,
        ("'Gender', row 0: BYTES data must be UTF-8",),
    ),
    (
        "bytes-not-a-category",
        lambda: binary(_blob("Geography", raw_tensor("BYTES", ["France", "Italy"]))),
        400,
        ("input 'Geography', row 1: Input should be 'France', 'Germany' or 'Spain'",),
    ),
    (
        "fp64-nan",
        lambda: binary(_blob("Balance", raw_tensor("FP64", [0.0, float("nan")]))),
        400,
        ("input 'Balance', row 1: Input should be a finite number",),
    ),
    (
        "int64-out-of-range",
        lambda: binary(_blob("Age", raw_tensor("INT64", [42, 2**63 - 1]))),
        400,
        ("input 'Age', row 1: Input should be less than or equal to 100",),
    ),
    (
        "fp32-binary",
        lambda: binary(lambda h, b: tensor(h, "Balance").update(datatype="FP32")),
        400,
        ("'Balance': datatype 'FP32' is not accepted",),
    ),
    (
        "data-and-binary-data-size",
        lambda: binary(lambda h, b: tensor(h, "Age").update(data=[42, 42])),
        400,
        ("both 'data' and 'binary_data_size'",),
    ),
    (
        "binary-data-size-without-the-header",
        lambda: v2(setting("Age", parameters={PARAM_BINARY_DATA_SIZE: 8})),
        400,
        ("needs the binary tensor data extension's Inference-Header-Content-Length header",),
    ),
    (
        "octet-stream-without-the-header",
        lambda: {"content": b"\x00" * 64, "headers": {"content-type": "application/octet-stream"}},
        400,
        ("needs the Inference-Header-Content-Length header",),
    ),
    (
        "binary-output-parameter-not-a-boolean",
        lambda: v2(lambda b: b.update(parameters={"binary_data_output": "yes"})),
        400,
        ("parameter 'binary_data_output' must be true or false",),
    ),
]


# (case, request kwargs, status, substrings of `error`); each becomes a HOSTILE case for /v2
HOSTILE_V2: list[tuple[str, Callable[[], dict[str, Any]], int, tuple[str, ...]]] = [
    # datatypes
    (
        "datatype-FP32",
        lambda: v2(setting("Age", datatype="FP32")),
        400,
        ("input 'Age': datatype 'FP32'", "FP64 or INT64"),
    ),
    ("datatype-BYTES-for-a-number", lambda: v2(setting("Age", datatype="BYTES")), 400, ("(allowed: FP64 or INT64)",)),
    ("datatype-FP64-for-a-category", lambda: v2(setting("Gender", datatype="FP64")), 400, ("'Gender'", "BYTES")),
    (
        "datatype-missing",
        lambda: v2(lambda b: tensor(b, "Tenure").pop("datatype")),
        400,
        ("'Tenure': datatype 'None'",),
    ),
    (
        "boolean-for-a-flag",
        lambda: v2(setting("HasCrCard", data=[True])),
        400,
        ("'HasCrCard', row 0", "found a boolean"),
    ),
    ("a-boolean-among-20-numbers", lambda: v2(_row_3_of("Tenure", True), rows=20), 400, ("'Tenure', row 3", "boolean")),
    ("string-for-a-number", lambda: v2(setting("Age", data=["42"])), 400, ("'Age', row 0", "found the string '42'")),
    ("null-for-a-number", lambda: v2(setting("Balance", data=[None])), 400, ("'Balance', row 0", "found null")),
    ("object-for-a-number", lambda: v2(setting("Balance", data=[{"v": 1}])), 400, ("'Balance', row 0", "an object")),
    (
        "fraction-in-INT64",
        lambda: v2(setting("Balance", datatype="INT64", data=[0.5])),
        400,
        ("INT64 data must be integers",),
    ),
    ("fraction-for-an-integer", lambda: v2(setting("Age", datatype="FP64", data=[42.5])), 400, ("fractional part",)),
    (
        "1e30-for-an-integer",
        lambda: v2(setting("Age", data=[10**30])),
        400,
        ("'Age', row 0", "less than or equal to 100"),
    ),
    ("number-for-a-category", lambda: v2(setting("Geography", data=[1])), 400, ("'Geography', row 0", "'Spain'")),
    ("null-for-a-category", lambda: v2(setting("Gender", data=[None])), 400, ("'Gender', row 0", "'Female' or 'Male'")),
    (
        "list-for-a-category",
        lambda: v2(setting("Gender", data=[["Male"]])),
        400,
        ("input 'Gender'",),
    ),
    (
        "category-in-row-3",
        lambda: v2(_row_3_of("Geography", "Italy"), rows=5),
        400,
        ("'Geography', row 3: Input should be",),
    ),
    (
        "nan-literal",
        lambda: raw_json(json.dumps(columnar_request([CUSTOMER])).replace("0.0", "NaN", 1)),
        400,
        ("invalid JSON",),
    ),
    (
        "1e400",
        lambda: raw_json(json.dumps(columnar_request([CUSTOMER])).replace("101348.88", "1e400")),
        400,
        ("infinity",),
    ),
    (
        "integer-of-5000-digits",
        lambda: raw_json(json.dumps(columnar_request([CUSTOMER])).replace("619", "9" * 5000)),
        400,
        ("invalid JSON",),
    ),
    # shapes and data
    ("shape-longer-than-data", lambda: v2(setting("CreditScore", shape=[2])), 400, ("needs 2 values, data has 1",)),
    (
        "data-longer-than-shape",
        lambda: v2(setting("Age", data=[42, 42])),
        400,
        ("'Age': shape [1] needs 1 values, data has 2",),
    ),
    (
        "shapes-differ-between-inputs",
        lambda: v2(setting("Age", shape=[2], data=[42, 42])),
        400,
        ("one column of the same rows",),
    ),
    (
        "shape-claims-10**18-rows",
        lambda: v2(every_input(shape=[10**18])),
        400,
        (f"at most {MAX_ROWS} rows per request",),
    ),
    ("shape-claims-10**9-columns", lambda: v2(setting("CreditScore", shape=[1, 10**9])), 400, ("is not a column's",)),
    ("shape-beyond-64-bits", lambda: v2(every_input(shape=[2**70])), 400, ("is not a column's",)),
    ("shape-negative", lambda: v2(setting("Age", shape=[-1])), 400, ("shape [-1] is not a column's",)),
    ("shape-of-booleans", lambda: v2(setting("Age", shape=[True])), 400, ("is not a column's",)),
    ("shape-a-string", lambda: v2(setting("Age", shape="1")), 400, ("is not a column's",)),
    ("shape-3-d", lambda: v2(setting("Age", shape=[1, 1, 1])), 400, ("is not a column's",)),
    ("shape-empty", lambda: v2(setting("Age", shape=[])), 400, ("is not a column's",)),
    ("zero-rows", lambda: v2(every_input(shape=[0], data=[])), 400, ("at least 1 row",)),
    ("nested-data-for-shape-N", lambda: v2(setting("Age", data=[[42]])), 400, ("'Age': data does not have shape [1]",)),
    (
        "ragged-data-for-shape-Nx1",
        lambda: v2(setting("Age", shape=[1, 1], data=[[42, 43]])),
        400,
        ("does not have shape",),
    ),
    ("data-a-number", lambda: v2(setting("Age", data=42)), 400, ("'data' must be a JSON array",)),
    ("data-an-object", lambda: v2(setting("Age", data={"0": 42})), 400, ("'data' must be a JSON array",)),
    ("data-missing", lambda: v2(lambda b: tensor(b, "Age").pop("data")), 400, ("'data' must be a JSON array",)),
    ("10001-rows", lambda: v2(rows=MAX_ROWS + 1, separators=(",", ":")), 400, (f"at most {MAX_ROWS} rows",)),
    ("body-over-the-limit", lambda: v2(setting("Geography", data=["a" * (MAX_BODY + MiB)])), 413, ("larger than",)),
    ("5-MiB-category-value", lambda: v2(setting("Geography", data=["a" * 5 * MiB])), 400, ("'Geography', row 0",)),
    ("deeply-nested-data", lambda: raw_json('{"inputs": ' + "[" * DEEP + "]" * DEEP + "}"), 400, ("invalid JSON",)),
    # inputs and outputs
    (
        "missing-input",
        lambda: v2(lambda b: b["inputs"].remove(tensor(b, "Tenure"))),
        400,
        ("missing input(s): Tenure",),
    ),
    ("unknown-input", lambda: v2(setting("Age", name="Ages")), 400, ("unknown input 'Ages'", "inputs: CreditScore")),
    (
        "input-given-twice",
        lambda: v2(lambda b: b["inputs"].append(tensor(b, "Age"))),
        400,
        ("input 'Age' is given twice",),
    ),
    ("input-without-a-name", lambda: v2(lambda b: b["inputs"][0].pop("name")), 400, ("inputs[0]: unknown input",)),
    (
        "input-not-an-object",
        lambda: v2(lambda b: b["inputs"].insert(0, [1])),
        400,
        ("inputs[0] must be a JSON object",),
    ),
    ("1-MB-input-name", lambda: v2(setting("Age", name="A" * MiB)), 400, ("unknown input 'AAAA",)),
    ("unknown-input-field", lambda: v2(setting("Age", dims=[1])), 400, ("'Age': unknown field 'dims'",)),
    ("inputs-empty", lambda: as_json({"inputs": []}), 400, ("'inputs' must be a JSON array",)),
    ("inputs-not-a-list", lambda: as_json({"inputs": {"Age": [42]}}), 400, ("'inputs' must be a JSON array",)),
    ("unknown-output", lambda: v2(lambda b: b.update(outputs=[{"name": "p"}])), 400, ("unknown output 'p'",)),
    ("output-name-an-object", lambda: v2(lambda b: b.update(outputs=[{"name": {}}])), 400, ("unknown output '{}'",)),
    ("input-name-an-object", lambda: v2(setting("Age", name={"a": 1})), 400, ("unknown input \"{'a': 1}\"",)),
    ("output-twice", lambda: v2(lambda b: b.update(outputs=[{"name": OUTPUT_PROBABILITY}] * 2)), 400, ("twice",)),
    ("outputs-not-a-list", lambda: v2(lambda b: b.update(outputs=OUTPUT_PROBABILITY)), 400, ("'outputs' must be",)),
    # the rest of the request
    ("unknown-top-level-field", lambda: v2(lambda b: b.update(output=[])), 400, ("unknown field 'output'",)),
    ("id-not-a-string", lambda: v2(lambda b: b.update(id=42)), 400, ("'id' must be a string",)),
    (
        "parameters-not-an-object",
        lambda: v2(lambda b: b.update(parameters=[1])),
        400,
        ("'parameters' must be a JSON object",),
    ),
    ("model-name-of-another-model", lambda: v2(lambda b: b.update(model_name="other")), 400, ("does not match",)),
    ("top-level-array", lambda: as_json([columnar_request([CUSTOMER])]), 400, ("must be a JSON object",)),
    ("top-level-string", lambda: as_json("inputs"), 400, ("must be a JSON object",)),
    ("empty-body", lambda: {"content": b"", "headers": JSON}, 400, ("empty body",)),
    ("invalid-utf8", lambda: {"content": b'{"inputs": "\xff"}', "headers": JSON}, 400, ("invalid JSON",)),
    ("lone-surrogate", lambda: raw_json('{"inputs": [], "id": "\\ud800"}'), 400, ("invalid JSON",)),
    # extensions and framing
    *HOSTILE_BINARY,
    (
        "shared-memory",
        lambda: v2(setting("Age", parameters={PARAM_SHARED_MEMORY_REGION: "r"})),
        400,
        (SHARED_MEMORY_UNSUPPORTED,),
    ),
    (
        "classification-output",
        lambda: v2(lambda b: b.update(outputs=[{"name": OUTPUT_PROBABILITY, "parameters": {PARAM_CLASSIFICATION: 2}}])),
        400,
        (CLASSIFICATION_UNSUPPORTED,),
    ),
    ("parameters-of-an-input-not-an-object", lambda: v2(setting("Age", parameters=3)), 400, ("'parameters' must be",)),
    (
        "text-plain",
        lambda: {"content": v2()["content"], "headers": {"content-type": "text/plain"}},
        415,
        ("'text/plain'",),
    ),
    (
        "gzip",
        lambda: {"content": gzip.compress(v2()["content"]), "headers": {**JSON, "content-encoding": "gzip"}},
        415,
        ("Content-Encoding 'gzip'",),
    ),
]


# (id, path, request kwargs (lazy: big bodies are built per test), status, substrings of `error`)
HOSTILE: list[tuple[str, str, Callable[[], dict[str, Any]], int, tuple[str, ...]]] = [
    # size
    (
        "body-over-the-limit",
        "/predict",
        lambda: as_json({"customer": {**CUSTOMER, "Geography": "a" * (MAX_BODY + MiB)}}),
        413,
        ("larger than", str(MAX_BODY)),
    ),
    (
        "body-of-5-MiB-under-the-limit",
        "/predict",
        lambda: as_json({"customer": {**CUSTOMER, "Geography": "a" * 5 * MiB}}),
        400,
        ("customer.Geography:", "'France', 'Germany', 'Spain'"),
    ),
    (
        "batch-far-over-the-row-limit",  # 40,000 rows, 6.9 MB: under the body limit
        "/predict_batch",
        lambda: as_json({"customers": [CUSTOMER] * 40_000}, separators=(",", ":")),
        400,
        ("customers:", "at most 10000 items"),
    ),
    (
        "batch-over-the-body-limit",
        "/predict_batch",
        lambda: as_json({"customers": [CUSTOMER] * 60_000}, separators=(",", ":")),
        413,
        ("larger than",),
    ),
    (
        "1-MB-category-value",
        "/predict",
        lambda: as_json({"customer": {**CUSTOMER, "Gender": "M" * MiB}}),
        400,
        ("customer.Gender:", "'Female', 'Male'"),
    ),
    (
        "1-MB-field-name",
        "/explain",
        lambda: as_json({"customer": {**CUSTOMER, "x" * MiB: 1}}),
        400,
        ("customer.xxxx", "Extra inputs are not permitted", "allowed fields: CreditScore"),
    ),
    # structure
    (
        "deeply-nested-arrays",
        "/predict",
        lambda: raw_json('{"customer": ' + "[" * DEEP + "]" * DEEP + "}"),
        400,
        ("Invalid JSON", "recursion limit"),
    ),
    (
        "deeply-nested-objects",
        "/predict_batch",
        lambda: raw_json('{"customers": [' + '{"a":' * DEEP + "1" + "}" * DEEP + "]}"),
        400,
        ("Invalid JSON", "recursion limit"),
    ),
    ("top-level-array", "/predict", lambda: as_json([CUSTOMER]), 400, ("body: Input should be an object",)),
    ("top-level-string", "/explain", lambda: as_json("customer"), 400, ("body: Input should be an object",)),
    ("top-level-number", "/predict_batch", lambda: as_json(42), 400, ("body: Input should be an object",)),
    ("top-level-array-card", "/model_card", lambda: as_json([{}]), 400, ("body: Input should be an object",)),
    ("customers-not-a-list", "/predict_batch", lambda: as_json({"customers": CUSTOMER}), 400, ("customers:", "array")),
    ("explain-null", "/predict", lambda: as_json({"customer": CUSTOMER, "explain": None}), 400, ("explain:",)),
    # bodies and their framing
    ("empty-body", "/predict", lambda: {"content": b"", "headers": JSON}, 400, ("customer: Field required",)),
    ("empty-body-batch", "/predict_batch", lambda: {"content": b"", "headers": JSON}, 400, ("customers:",)),
    (
        "content-type-text-plain",
        "/predict",
        lambda: {"content": json.dumps({"customer": CUSTOMER}).encode(), "headers": {"content-type": "text/plain"}},
        415,
        ("'text/plain'", "application/json"),
    ),
    (
        "content-type-xml",
        "/explain",
        lambda: {"content": b"<customer/>", "headers": {"content-type": "application/xml"}},
        415,
        ("application/json",),
    ),
    (
        "content-type-form-urlencoded",
        "/predict",
        lambda: {"content": b"customer=%7B%7D", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        415,
        ("application/json",),
    ),
    (
        "content-encoding-gzip-claimed-but-plain",
        "/predict",
        lambda: {
            "content": json.dumps({"customer": CUSTOMER}).encode(),
            "headers": {**JSON, "content-encoding": "gzip"},
        },
        415,
        ("Content-Encoding 'gzip'", "uncompressed"),
    ),
    (
        "content-encoding-gzip-real",
        "/predict_batch",
        lambda: {
            "content": gzip.compress(json.dumps({"customers": [CUSTOMER]}).encode()),
            "headers": {**JSON, "content-encoding": "gzip"},
        },
        415,
        ("Content-Encoding",),
    ),
    (
        "invalid-utf8-bytes",
        "/predict",
        lambda: {"content": b'{"customer": {"Geography": "Fr\xff\xfence"}}', "headers": JSON},
        400,
        ("Invalid JSON",),
    ),
    (
        "utf16-body",
        "/predict",
        lambda: {
            "content": json.dumps({"customer": CUSTOMER}).encode("utf-16"),
            "headers": {"content-type": "application/json; charset=utf-16"},
        },
        400,
        ("Invalid JSON",),
    ),
    (
        "multipart-text-part-to-a-json-api",
        "/predict",
        lambda: _multipart(
            b'--b0undary\r\nContent-Disposition: form-data; name="customer"\r\n\r\n'
            + json.dumps(CUSTOMER).encode()
            + b"\r\n--b0undary--\r\n"
        ),
        400,
        ("file parts only", "'customer'"),
    ),
    (
        "multipart-without-boundary",
        "/predict",
        lambda: _multipart(b"--x\r\n\r\n", boundary=None),
        400,
        ("malformed multipart", "boundary"),
    ),
    (
        "multipart-garbage",
        "/model_card",
        lambda: _multipart(b"\x00\xffnot multipart at all"),
        400,
        ("malformed multipart",),
    ),
    # values
    (
        "unicode-category",
        "/predict",
        lambda: as_json({"customer": {**CUSTOMER, "Geography": "Fr\u00e4nce\U0001f600\u202e"}}, ensure_ascii=False),
        400,
        ("customer.Geography:", "'France'"),
    ),
    (
        "unicode-lookalike-category",
        "/explain",
        lambda: as_json({"customer": {**CUSTOMER, "Gender": "\uff2d\uff41\uff4c\uff45"}}),  # fullwidth "Male"
        400,
        ("customer.Gender:", "'Female', 'Male'"),
    ),
    (
        "unicode-field-name",
        "/predict",
        lambda: as_json({"customer": {**CUSTOMER, "\u00c4ge\U0001f600": 42}}),
        400,
        ("customer.\u00c4ge\U0001f600:", "allowed fields: CreditScore"),
    ),
    (
        "lone-surrogate-escape",
        "/predict",
        lambda: raw_json(json.dumps({"customer": CUSTOMER}).replace('"France"', '"\\ud800"')),
        400,
        ("Invalid JSON",),
    ),
    (
        "nan-in-batch-rows",
        "/predict_batch",
        lambda: raw_json(
            json.dumps({"customers": [CUSTOMER, CUSTOMER]}).replace('"CreditScore": 619', '"CreditScore": NaN', 2)
        ),
        400,
        ("customers.0.CreditScore:", "customers.1.CreditScore:", "[300, 900]"),
    ),
    (
        "infinity-on-explain",
        "/explain",
        lambda: raw_json(json.dumps({"customer": CUSTOMER}).replace("101348.88", "Infinity")),
        400,
        ("customer.EstimatedSalary:", "[0, 1e+07]"),
    ),
    (
        "float-as-string",
        "/predict",
        lambda: as_json({"customer": {**CUSTOMER, "Balance": "0.0"}}),
        400,
        ("customer.Balance:", "valid number"),
    ),
    (
        "int-as-string-in-batch",
        "/predict_batch",
        lambda: as_json({"customers": [{**CUSTOMER, "Tenure": "2"}]}),
        400,
        ("customers.0.Tenure:", "valid integer", "[0, 60]"),
    ),
    (
        "extra-field-in-a-batch-row",
        "/predict_batch",
        lambda: as_json({"customers": [CUSTOMER, {**CUSTOMER, "Surname": "Hargrave"}]}),
        400,
        ("customers.1.Surname:", "allowed fields"),
    ),
    (
        "huge-integer-10**400",
        "/predict",
        lambda: as_json({"customer": {**CUSTOMER, "Age": 10**400}}),
        400,
        ("customer.Age:", "[18, 100]"),
    ),
    (
        "huge-integer-10**400-for-a-float",
        "/explain",
        lambda: as_json({"customer": {**CUSTOMER, "Balance": 10**400}}),
        400,
        ("customer.Balance:", "finite number"),
    ),
    (
        "float-1e400",
        "/predict",
        lambda: raw_json(json.dumps({"customer": CUSTOMER}).replace("101348.88", "1e400")),
        400,
        ("customer.EstimatedSalary:",),
    ),
    (
        "integer-of-5000-digits",
        "/predict",
        lambda: raw_json(json.dumps({"customer": CUSTOMER}).replace('"Age": 42', '"Age": ' + "9" * 5000)),
        400,
        ("Invalid JSON", "number out of range"),
    ),
    (
        "duplicated-key-last-one-invalid",
        "/predict",
        lambda: raw_json(json.dumps({"customer": CUSTOMER})[:-2] + ', "Age": 999}}'),
        400,
        ("customer.Age:", "[18, 100]"),
    ),
    *[(f"v2-{case}", V2_INFER, make, status, says) for case, make, status, says in HOSTILE_V2],
]


@pytest.mark.parametrize(
    ("path", "request_kwargs", "status", "says"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_payload_gets_a_clear_4xx(server, path, request_kwargs, status, says):
    r = httpx.post(f"{server.url}{path}", timeout=60, **request_kwargs())
    assert r.status_code == status, r.text[:500]
    error = error_of(r)
    for text in says:
        assert text in error, error[:500]
    assert len(error) < 3 * MiB


def test_duplicated_keys_resolve_to_the_last_one(server, before):
    """Not an error, but never ambiguous: the last occurrence wins, as in most JSON parsers."""
    body = json.dumps({"customer": CUSTOMER})[:-2] + ', "Age": 999, "Age": 42}}'
    body = body.replace('"Age": 42,', '"Age": 17,', 1)  # the first Age is invalid, the last one valid
    r = httpx.post(f"{server.url}/predict", content=body.encode(), headers=JSON, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["churn_probability"] == before["probability"]


def test_multipart_json_file_part_is_bentomls_multipart_encoding(server, before):
    """BentoML accepts any API as multipart/form-data; a JSON *file* part is validated by the
    same strict model, so it is not a way around validation."""
    good = httpx.post(f"{server.url}/predict", files={"customer": ("c.json", json.dumps(CUSTOMER), "application/json")})
    assert good.status_code == 200 and good.json()["churn_probability"] == before["probability"]
    bad = {**CUSTOMER, "Age": "42"}
    r = httpx.post(f"{server.url}/predict", files={"customer": ("c.json", json.dumps(bad), "application/json")})
    assert r.status_code == 400 and "customer.Age:" in error_of(r)


# ----------------------------------------------------------------------------- raw HTTP abuse


def raw_http(server, head: bytes, chunks: list[bytes] = (), *, close: bool = False, timeout: float = 20) -> bytes:
    """Send a hand-made request (what httpx refuses to send); return the raw response."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head)
            for chunk in chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) and closed before reading everything
        if close:
            return b""
        data = b""
        while True:
            try:
                block = s.recv(65536)
            except ConnectionResetError:
                break
            if not block:
                return data
            data += block
        return data


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def _head(*headers: bytes, path: bytes = b"/predict") -> bytes:
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


BODY = json.dumps({"customer": CUSTOMER}).encode()


def chunked_just_over_the_limit() -> list[bytes]:
    """MAX_BODY + 1 bytes in 1 MiB chunks, unterminated. Just over: the server has read all
    of it when it answers 413, so closing does not reset the connection under our reply."""
    sizes = [MiB] * (MAX_BODY // MiB) + [MAX_BODY % MiB + 1]
    return [b"%x\r\n" % size + b"a" * size + b"\r\n" for size in sizes]


# (id, make (head, body parts), status). Bodies are left out where the server answers on the
# headers alone, for the same reason.
RAW: list[tuple[str, Callable[[], tuple[bytes, list[bytes]]], int]] = [
    (
        "chunked-without-content-length-over-the-limit",
        lambda: (
            _head(b"Content-Type: application/json", b"Transfer-Encoding: chunked"),
            chunked_just_over_the_limit(),
        ),
        413,
    ),
    (
        # Both framing headers: request smuggling's raw material. httptools (uvicorn's parser,
        # installed with the service) refuses it with 400 before any application code runs
        # (RFC 9112 6.3 lets a server reject it); h11 ignored Content-Length and the byte
        # count made it a 413.
        "chunked-with-a-small-content-length-over-the-limit",
        lambda: (
            _head(b"Content-Type: application/json", b"Content-Length: 10", b"Transfer-Encoding: chunked"),
            chunked_just_over_the_limit(),
        ),
        400,
    ),
    (
        "content-length-far-over-the-limit",
        lambda: (_head(b"Content-Type: application/json", b"Content-Length: 1000000000000"), []),
        413,
    ),
    (
        "content-length-not-a-number",
        lambda: (_head(b"Content-Type: application/json", b"Content-Length: abc"), []),
        400,
    ),
    ("content-length-negative", lambda: (_head(b"Content-Type: application/json", b"Content-Length: -5"), []), 400),
    ("conflicting-content-lengths", lambda: (_head(b"Content-Length: 80", b"Content-Length: 5"), []), 400),
    (
        "invalid-chunk-size",
        lambda: (_head(b"Content-Type: application/json", b"Transfer-Encoding: chunked"), [b"zz\r\nabc\r\n0\r\n\r\n"]),
        400,
    ),
    ("transfer-encoding-gzip", lambda: (_head(b"Content-Type: application/json", b"Transfer-Encoding: gzip"), []), 400),
    (
        "v2-chunked-without-content-length-over-the-limit",
        lambda: (
            _head(b"Content-Type: application/json", b"Transfer-Encoding: chunked", path=V2_INFER.encode()),
            chunked_just_over_the_limit(),
        ),
        413,
    ),
    (
        "v2-content-length-far-over-the-limit",
        lambda: (_head(b"Content-Length: 1000000000000", path=V2_INFER.encode()), []),
        413,
    ),
    (
        "chunked-small-body",  # control: chunked itself is fine
        lambda: (
            _head(b"Content-Type: application/json", b"Transfer-Encoding: chunked"),
            [b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"],
        ),
        200,
    ),
]


@pytest.mark.parametrize(("make", "status"), [r[1:] for r in RAW], ids=[r[0] for r in RAW])
def test_raw_http_request(server, make, status):
    head, chunks = make()
    response = raw_http(server, head, chunks)
    assert status_of(response) == status, response[:300]
    if status == 413:
        assert b"larger than" in response


@pytest.mark.parametrize("sent", [0, 100])
def test_body_shorter_than_its_content_length_client_closes(server, sent):
    """The client promises 1,000 bytes, sends fewer and hangs up: no 5xx is recorded."""
    before_5xx = five_xx(server)
    raw_http(server, _head(b"Content-Type: application/json", b"Content-Length: 1000"), [BODY[:sent]], close=True)
    time.sleep(0.3)
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert five_xx(server) == before_5xx


# ----------------------------------------------------------------------------- CSV jobs

HEADER = ",".join(FEATURE_NAMES)
ROW = ",".join(str(CUSTOMER[n]) for n in FEATURE_NAMES)


def run_job(server, data: bytes) -> tuple[httpx.Response, dict[str, Any] | None]:
    """Submit a CSV to POST /jobs; if it is accepted, wait for the job and return its result."""
    r = httpx.post(f"{server.url}/jobs", files={"file": ("c.csv", data, "text/csv")}, timeout=30)
    if r.status_code != 202:
        assert 400 <= r.status_code < 500, r.text[:300]
        return r, None
    status = wait_for_job(server.url, r.json()["job_id"], timeout=60)
    result = httpx.get(f"{server.url}/jobs/{status['job_id']}/result", timeout=30)
    assert result.status_code == 200, result.text[:300]
    out = result.json()
    assert status["rows_done"] == status["rows_total"] == len(out["predictions"]) + len(out["errors"])
    assert all(e["error"] and e["row"] >= 1 for e in out["errors"])
    return r, out


def _wide_header() -> bytes:
    return (",".join(f"c{i}" for i in range(500)) + "\n" + ",".join("1" * 500) + "\n").encode()


# (id, file, expected): {"refused": text of the 4xx error} or the scored/failed counts and a
# text of the row errors
HOSTILE_CSV: list[tuple[str, Callable[[], bytes], dict[str, Any]]] = [
    ("binary-garbage", lambda: bytes(range(256)) * 64, {"refused": "not UTF-8"}),
    ("utf16", lambda: f"{HEADER}\n{ROW}\n".encode("utf-16"), {"refused": "not UTF-8"}),
    ("empty-file", lambda: b"", {"refused": "missing column(s)"}),
    (
        "missing-and-miscased-columns",
        lambda: f"{HEADER.replace('Balance', 'balance').replace(',EstimatedSalary', '')}\n{ROW}\n".encode(),
        {"refused": "missing column(s): Balance, EstimatedSalary"},
    ),
    ("500-columns-none-of-them-ours", _wide_header, {"refused": "missing column(s)"}),
    ("header-only", lambda: f"{HEADER}\n".encode(), {"refused": "no data rows"}),
    (
        "field-over-128-KiB",
        lambda: f"{HEADER}\n{ROW.replace('France', 'x' * 200_000)}\n".encode(),
        {"refused": "unreadable"},
    ),
    (
        "a-row-with-500-fields",
        lambda: f"{HEADER}\n{ROW + ',1' * 490}\n{ROW}\n".encode(),
        {"scored": 1, "failed": 1, "error": "wrong number of fields"},
    ),
    (
        "quoted-newline-in-a-category",
        lambda: f"{HEADER}\n{ROW.replace('France', chr(34) + 'Fra' + chr(10) + 'nce' + chr(34))}\n{ROW}\n".encode(),
        {"scored": 1, "failed": 1, "error": "Geography"},
    ),
    (
        "unterminated-quote",  # would swallow the rest of the file into one field
        lambda: f"{HEADER}\n{ROW.replace('France', chr(34) + 'France')}\n{ROW}\n".encode(),
        {"refused": "ends inside a quoted field"},
    ),
    (
        "nul-bytes-and-control-characters",
        lambda: f"{HEADER}\n{ROW.replace('France', 'Fr' + chr(0) + 'ance' + chr(27))}\n".encode(),
        {"scored": 0, "failed": 1, "error": "Geography"},
    ),
    (
        "nan-infinity-and-huge-exponents",
        lambda: f"{HEADER}\nnan,France,Female,inf,2,NaN,1e999,1,1,-inf\n".encode(),
        {"scored": 0, "failed": 1, "error": "CreditScore"},
    ),
    (
        "integer-of-5000-digits",
        lambda: f"{HEADER}\n{ROW.replace('619', '9' * 5000, 1)}\n".encode(),
        {"scored": 0, "failed": 1, "error": "CreditScore: a cell of 5,000 characters"},
    ),
    (
        "duplicated-header-column",  # the first column of a repeated name is read (README)
        lambda: f"{HEADER},Age\n{ROW},999\n".encode(),
        {"scored": 1, "failed": 0},
    ),
    (
        "bom-and-crlf",  # control: a valid file written by Excel on Windows
        lambda: b"\xef\xbb\xbf" + f"{HEADER}\r\n{ROW}\r\n".encode(),
        {"scored": 1, "failed": 0},
    ),
]


@pytest.mark.parametrize(("make", "expect"), [c[1:] for c in HOSTILE_CSV], ids=[c[0] for c in HOSTILE_CSV])
def test_hostile_csv_is_refused_at_once_or_its_bad_rows_reported(server, make, expect):
    submitted, out = run_job(server, make())
    if "refused" in expect:
        assert out is None and submitted.status_code == 400, submitted.text[:300]
        assert expect["refused"] in error_of(submitted)
        return
    assert out is not None, submitted.text[:300]
    assert (len(out["predictions"]), len(out["errors"])) == (expect["scored"], expect["failed"]), out
    if "error" in expect:
        assert expect["error"] in " ".join(e["error"] for e in out["errors"]), out


# ----------------------------------------------------------------------------- afterwards


def test_service_is_unharmed_by_all_of_the_above(server, before):
    assert server.proc.poll() is None, "bentoml serve died"
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert probability(server) == before["probability"]
    assert five_xx(server) == before["five_xx"], "hostile input produced 5xx responses"
    exceptions = unexpected_exceptions(server.log()[before["log_offset"] :])
    assert not exceptions, f"hostile input raised unexpected exceptions in the server: {sorted(set(exceptions))}"


# ----------------------------------------------------------------------------- known issues
# Issues the fuzzing found and that were then fixed; each raises KnownIssue if it comes back.


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_explain_flag_is_strict(server, value):
    r = httpx.post(f"{server.url}/predict", json={"customer": CUSTOMER, "explain": value})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        raise KnownIssue(f"explain={value!r} accepted as {r.json()['explanation'] is not None}")
    assert "explain:" in error_of(r)


def test_unknown_top_level_fields_are_refused(server):
    r = httpx.post(f"{server.url}/predict", json={"customer": CUSTOMER, "explian": True})  # typo of explain
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        raise KnownIssue("a misspelled `explain` is silently ignored")
    assert "explian" in error_of(r)


def test_non_utf8_content_type_header_gets_a_complete_response(server):
    response = raw_http(server, _head(b"Content-Type: application/json\xff", b"Content-Length: %d" % len(BODY)), [BODY])
    assert status_of(response) == 415
    head, _, body = response.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
    if len(body) != length:
        raise KnownIssue(f"{len(body)} of {length} body bytes sent")


def test_server_survives_the_known_issues(server, before):
    assert server.proc.poll() is None, "bentoml serve died"
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert probability(server) == before["probability"]
