"""Real third-party Open Inference Protocol clients against a real `bentoml serve`, with their defaults.

NVIDIA's tritonclient (http: binary tensors; grpc: raw_input_contents) and KServe's
InferenceRESTClient (protocol v2) and InferenceGRPCClient run tests/v2_clients.py in their own
venv, .venv-clients (`make install` and `make test` create it from requirements/clients.txt: their
pins clash with the service's), one process per client. What they saw is compared with the
service's own /predict_batch for the same customers.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from harness.servers import ROOT
from models.schema import EXAMPLE_CUSTOMER, json_customer
from models.store import MODEL_NAME
from serving.v2.codec import (
    EXTENSIONS,
    INPUT_DATATYPES,
    OUTPUT_DECISION,
    OUTPUT_PROBABILITY,
    OUTPUTS,
    PARAM_MODEL_VERSION,
    PARAM_THRESHOLD,
    SERVER_NAME,
)

pytestmark = pytest.mark.integration  # real `bentoml serve` processes

CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
SCRIPT = ROOT / "tests" / "v2_clients.py"
CLIENTS = ("tritonclient", "tritonclient_grpc", "kserve", "kserve_grpc")


@pytest.fixture(scope="module")
def rows(sample_rows) -> list[dict]:
    return [json_customer(r) for r in sample_rows[:50]]


@pytest.fixture(scope="module")
def expected(server, rows) -> dict:
    r = httpx.post(f"{server.url}/predict_batch", json={"customers": rows}, timeout=60)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    return {
        "probability": [p["churn_probability"] for p in predictions],
        "decision": [p["will_churn"] for p in predictions],
        "tag": predictions[0]["model_version"],
        "threshold": predictions[0]["threshold"],
    }


@pytest.fixture(scope="module")
def seen(server, trained, rows) -> dict[str, dict]:
    """What each client saw: the scripts run at once (each takes seconds to import its client)."""
    if not CLIENTS_PYTHON.exists():
        pytest.fail(f"{CLIENTS_PYTHON} is missing: run `make install` (the clients' venv is part of it)")
    plan = {
        "url": server.url,
        "grpc": server.grpc_address,
        "model": MODEL_NAME,
        "version": trained.model.tag.version,
        "datatypes": INPUT_DATATYPES,
        "outputs": list(OUTPUTS),
        "rows": rows,
        "bad_rows": [EXAMPLE_CUSTOMER, {**EXAMPLE_CUSTOMER, "Age": 12}],
    }
    procs = {
        client: subprocess.Popen(
            [str(CLIENTS_PYTHON), str(SCRIPT), client],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",  # nothing of this repository on the clients' import path
        )
        for client in CLIENTS
    }
    out = {}
    for client, proc in procs.items():
        stdout, stderr = proc.communicate(json.dumps(plan), timeout=300)
        assert proc.returncode == 0, f"{client} script failed:\n{stderr[-3000:]}"
        out[client] = json.loads(stdout)
    return out


def test_clients_are_the_pinned_ones(seen):
    pins = dict(
        line.split("==")
        for line in (ROOT / "requirements" / "clients.txt").read_text().splitlines()
        if "==" in line and not line.startswith(("#", " "))
    )
    for client in CLIENTS:
        package = client.removesuffix("_grpc")
        assert seen[client]["version"] == pins[package], client


def test_tritonclient_health_and_metadata(seen, trained):
    triton = seen["tritonclient"]
    assert triton["live"] is True and triton["ready"] is True
    assert triton["model_ready"] is True and triton["model_ready_versioned"] is True
    assert triton["model_ready_other_version"] is False
    assert triton["server_metadata"]["name"] == SERVER_NAME
    assert triton["server_metadata"]["extensions"] == list(EXTENSIONS)
    metadata = triton["model_metadata"]
    assert metadata["name"] == MODEL_NAME and metadata["versions"] == [trained.model.tag.version]
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        (name, datatype, [-1]) for name, datatype in INPUT_DATATYPES.items()
    ]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == list(OUTPUTS.items())


def test_tritonclient_infer_gives_predict_batchs_numbers(seen, expected, trained):
    """tritonclient's defaults: binary inputs and binary outputs (binary_data_output)."""
    infer = seen["tritonclient"]["infer"]
    assert infer["churn_probability"] == expected["probability"]
    assert infer["will_churn"] == expected["decision"]
    assert infer["dtypes"] == ["float64", "bool"]
    response = infer["response"]
    assert response["model_name"] == MODEL_NAME and response["model_version"] == trained.model.tag.version
    assert response["parameters"] == {PARAM_MODEL_VERSION: expected["tag"], PARAM_THRESHOLD: expected["threshold"]}
    rows = len(expected["probability"])
    assert [(o["name"], o["parameters"]) for o in response["outputs"]] == [
        (OUTPUT_PROBABILITY, {"binary_data_size": 8 * rows}),
        (OUTPUT_DECISION, {"binary_data_size": rows}),
    ]
    assert "id" not in response  # none was sent


def test_tritonclient_versioned_infer_with_one_requested_output_and_an_id(seen, expected):
    one = seen["tritonclient"]["infer_one"]
    # one row alone may round the last bit differently from a batch of 50
    assert one["churn_probability"] == pytest.approx(expected["probability"][:1], rel=0, abs=1e-12)
    assert one["response"]["id"] == "triton-1"
    assert [o["name"] for o in one["response"]["outputs"]] == [OUTPUT_PROBABILITY]
    assert "data" in one["response"]["outputs"][0]  # asked for as JSON


def test_tritonclient_binary_and_json_inputs_mixed(seen, expected):
    mixed = seen["tritonclient"]["infer_mixed"]
    assert mixed["churn_probability"] == pytest.approx(expected["probability"][:3], rel=0, abs=1e-12)
    assert mixed["will_churn"] == expected["decision"][:3] and mixed["outputs_as_json"]


@pytest.mark.parametrize("client", ["tritonclient", "tritonclient_grpc"])
def test_tritonclient_gets_clear_errors(seen, client):
    errors = seen[client]["errors"]
    invalid, not_found = ("400", "404") if client == "tritonclient" else ("INVALID_ARGUMENT", "NOT_FOUND")
    assert errors["bad_value"]["status"].endswith(invalid)
    assert errors["bad_value"]["message"].startswith("input 'Age', row 1: Input should be greater than or equal to 18")
    assert errors["unknown_model"]["status"].endswith(not_found) and "'churn_v0'" in errors["unknown_model"]["message"]
    assert errors["unknown_version"]["status"].endswith(not_found) and "'v0'" in errors["unknown_version"]["message"]
    # Triton's model configuration extension: not served
    assert errors["model_config"]["status"].endswith("404" if client == "tritonclient" else "UNIMPLEMENTED")


def test_tritonclient_grpc(seen, expected, trained):
    triton = seen["tritonclient_grpc"]
    assert triton["live"] is True and triton["ready"] is True
    assert triton["model_ready"] is True and triton["model_ready_versioned"] is True
    assert triton["server_metadata"] == {
        "name": SERVER_NAME,
        "version": triton["server_metadata"]["version"],
        "extensions": list(EXTENSIONS),
    }
    metadata = triton["model_metadata"]
    assert metadata["name"] == MODEL_NAME and metadata["versions"] == [trained.model.tag.version]
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        (name, datatype, ["-1"])
        for name, datatype in INPUT_DATATYPES.items()  # int64s are JSON strings
    ]
    infer = triton["infer"]
    assert infer["churn_probability"] == expected["probability"]
    assert infer["will_churn"] == expected["decision"]
    assert infer["dtypes"] == ["float64", "bool"]
    assert infer["response"]["parameters"] == {
        PARAM_MODEL_VERSION: {"string_param": expected["tag"]},
        PARAM_THRESHOLD: {"double_param": expected["threshold"]},
    }
    one = triton["infer_one"]
    assert one["churn_probability"] == pytest.approx(expected["probability"][:1], rel=0, abs=1e-12)
    assert one["response"]["id"] == "triton-grpc-1"
    assert [o["name"] for o in one["response"]["outputs"]] == [OUTPUT_PROBABILITY]


def test_kserve_client(seen, expected):
    kserve = seen["kserve"]
    assert kserve["live"] is True and kserve["ready"] is True and kserve["model_ready"] is True
    infer = kserve["infer"]
    assert infer["model_name"] == MODEL_NAME and infer["id"] == "kserve-1"
    assert infer["outputs"] == [OUTPUT_PROBABILITY, OUTPUT_DECISION]
    assert infer["churn_probability"] == expected["probability"]
    assert infer["will_churn"] == expected["decision"]
    assert infer["parameters"] == {PARAM_MODEL_VERSION: expected["tag"], PARAM_THRESHOLD: expected["threshold"]}
    assert kserve["infer_selected"] == {"outputs": [OUTPUT_DECISION], "will_churn": expected["decision"][:3]}
    bad = kserve["bad_value"]
    assert bad["status"] == 400 and "input 'Age', row 1:" in bad["message"], bad


def test_kserve_client_with_binary_tensors(seen, expected):
    binary = seen["kserve"]["infer_binary"]
    assert binary == {OUTPUT_PROBABILITY: expected["probability"], OUTPUT_DECISION: expected["decision"]}


def test_kserve_grpc_client(seen, expected):
    kserve = seen["kserve_grpc"]
    assert kserve["live"] is True and kserve["ready"] is True and kserve["model_ready"] is True
    for form in ("infer", "infer_typed"):  # raw_input_contents, then typed contents
        infer = kserve[form]
        assert infer["outputs"] == [OUTPUT_PROBABILITY, OUTPUT_DECISION]
        assert infer["churn_probability"] == expected["probability"], form
        assert infer["will_churn"] == expected["decision"], form
    assert kserve["infer"]["model_name"] == MODEL_NAME and kserve["infer"]["id"] == "kserve-grpc-1"
    # KServe 0.21's InferParameter has no double_param (the specification's field 4): the
    # threshold reaches it as an unknown field; the model version is a string_param
    assert expected["tag"] in kserve["infer"]["parameters"][PARAM_MODEL_VERSION]
    assert kserve["infer_selected"]["outputs"] == [OUTPUT_DECISION]
    assert kserve["infer_selected"]["will_churn"] == expected["decision"][:3]
    bad = kserve["bad_value"]
    assert bad["status"] == "INVALID_ARGUMENT" and bad["message"].startswith("input 'Age', row 1:"), bad
