"""Third-party Open Inference Protocol clients against a running server (tests/test_v2_clients.py).

Runs in the clients' own venv (.venv-clients: tritonclient and kserve pin packages that clash
with the service's), so it imports neither the service nor the test suite; one client per
process (tritonclient.grpc and kserve both register the `inference` protobuf messages). It
reads a plan from stdin (server URL and gRPC address, model name and version, the inputs'
datatypes, customers) and prints what the client saw as JSON; the tests compare that with the
service's own APIs. Every client runs with its defaults (tritonclient: binary tensors).

    .venv-clients/bin/python tests/v2_clients.py {tritonclient|tritonclient_grpc|kserve|kserve_grpc} < plan.json
"""

from __future__ import annotations

import asyncio
import json
import sys
from importlib.metadata import version
from typing import Any

import numpy as np

NUMPY_TYPES = {"FP64": np.float64, "INT64": np.int64, "BYTES": np.object_}


def columns(plan: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {
        name: np.array([r[name] for r in rows], dtype=NUMPY_TYPES[datatype])
        for name, datatype in plan["datatypes"].items()
    }


def run_tritonclient(plan: dict[str, Any]) -> dict[str, Any]:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=plan["url"].removeprefix("http://"))
    model, served = plan["model"], plan["version"]

    def inputs(rows: list[dict[str, Any]], binary: bool = False) -> list:
        out = []
        for name, array in columns(plan, rows).items():
            tensor = httpclient.InferInput(name, list(array.shape), plan["datatypes"][name])
            tensor.set_data_from_numpy(array, binary_data=binary)
            out.append(tensor)
        return out

    def error(call) -> dict[str, Any]:
        try:
            call()
        except InferenceServerException as exc:
            return {"status": exc.status(), "message": exc.message()}
        return {"status": None, "message": "no error"}

    seen: dict[str, Any] = {
        "version": version("tritonclient"),
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "model_ready_versioned": client.is_model_ready(model, served),
        "model_ready_other_version": client.is_model_ready(model, "no-such-version"),
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata(model),
    }
    # tritonclient's defaults: binary inputs, and every output asked for in binary ("binary_data_output")
    result = client.infer(model, inputs(plan["rows"]))
    seen["infer"] = {
        "response": result.get_response(),
        "churn_probability": result.as_numpy(plan["outputs"][0]).tolist(),
        "will_churn": result.as_numpy(plan["outputs"][1]).tolist(),
        "dtypes": [str(result.as_numpy(name).dtype) for name in plan["outputs"]],
    }
    # JSON tensors, one output asked for as JSON
    one = client.infer(
        model,
        inputs(plan["rows"][:1], binary=False),
        model_version=served,
        outputs=[httpclient.InferRequestedOutput(plan["outputs"][0], binary_data=False)],
        request_id="triton-1",
    )
    seen["infer_one"] = {"response": one.get_response(), "churn_probability": one.as_numpy(plan["outputs"][0]).tolist()}
    # binary and JSON inputs mixed in one request, outputs as JSON
    mixed = inputs(plan["rows"][:3])
    for tensor in mixed[::2]:
        tensor.set_data_from_numpy(columns(plan, plan["rows"][:3])[tensor.name()], binary_data=False)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in plan["outputs"]]
    result = client.infer(model, mixed, outputs=outputs)
    seen["infer_mixed"] = {
        "churn_probability": result.as_numpy(plan["outputs"][0]).tolist(),
        "will_churn": result.as_numpy(plan["outputs"][1]).tolist(),
        "outputs_as_json": all("data" in o for o in result.get_response()["outputs"]),
    }
    seen["errors"] = {
        "bad_value": error(lambda: client.infer(model, inputs(plan["bad_rows"]))),
        "unknown_model": error(lambda: client.infer("churn_v0", inputs(plan["rows"][:1]))),
        "unknown_version": error(lambda: client.infer(model, inputs(plan["rows"][:1]), model_version="v0")),
        "model_config": error(lambda: client.get_model_config(model)),
    }
    client.close()
    return seen


async def run_kserve(plan: dict[str, Any]) -> dict[str, Any]:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    model, url = plan["model"], plan["url"]

    def request(rows: list[dict[str, Any]], binary: bool = False, **kwargs: Any) -> InferRequest:
        tensors = []
        for name, array in columns(plan, rows).items():
            tensor = InferInput(name, list(array.shape), plan["datatypes"][name])
            tensor.set_data_from_numpy(array, binary_data=binary)
            tensors.append(tensor)
        return InferRequest(model_name=model, infer_inputs=tensors, **kwargs)

    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as client:
        seen: dict[str, Any] = {
            "version": version("kserve"),
            "live": await client.is_server_live(url),
            "ready": await client.is_server_ready(url),
            "model_ready": await client.is_model_ready(url, model),
        }
        response = await client.infer(url, request(plan["rows"], request_id="kserve-1"), model_name=model)
        by_name = {output.name: output for output in response.outputs}
        seen["infer"] = {
            "model_name": response.model_name,
            "id": response.id,
            "parameters": response.parameters,
            "outputs": [output.name for output in response.outputs],
            "churn_probability": by_name[plan["outputs"][0]].as_numpy().tolist(),
            "will_churn": by_name[plan["outputs"][1]].as_numpy().tolist(),
        }
        binary = await client.infer(url, request(plan["rows"], binary=True), model_name=model)
        seen["infer_binary"] = {o.name: o.as_numpy().tolist() for o in binary.outputs}
        selected = await client.infer(
            url, request(plan["rows"][:3], request_outputs=[RequestedOutput(plan["outputs"][1])]), model_name=model
        )
        seen["infer_selected"] = {
            "outputs": [output.name for output in selected.outputs],
            "will_churn": selected.outputs[0].as_numpy().tolist(),
        }
        try:
            await client.infer(url, request(plan["bad_rows"]), model_name=model)
            seen["bad_value"] = {"status": None, "message": "no error"}
        except Exception as exc:  # httpx.HTTPStatusError, carrying the server's "error"
            status = getattr(getattr(exc, "response", None), "status_code", None)
            seen["bad_value"] = {"status": status, "message": str(exc), "type": type(exc).__name__}
    return seen


def run_tritonclient_grpc(plan: dict[str, Any]) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    headers = {"authorization": f"Bearer {plan['api_key']}"} if plan.get("api_key") else None
    client = grpcclient.InferenceServerClient(url=plan["grpc"])
    model, served = plan["model"], plan["version"]

    def inputs(rows: list[dict[str, Any]]) -> list:
        out = []
        for name, array in columns(plan, rows).items():
            tensor = grpcclient.InferInput(name, list(array.shape), plan["datatypes"][name])
            tensor.set_data_from_numpy(array)  # raw_input_contents, as tritonclient does by default
            out.append(tensor)
        return out

    def error(call) -> dict[str, Any]:
        try:
            call()
        except InferenceServerException as exc:
            return {"status": exc.status(), "message": exc.message()}
        return {"status": None, "message": "no error"}

    seen: dict[str, Any] = {
        "version": version("tritonclient"),
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(model, headers=headers),
        "model_ready_versioned": client.is_model_ready(model, served, headers=headers),
        "server_metadata": client.get_server_metadata(as_json=True, headers=headers),
        "model_metadata": client.get_model_metadata(model, as_json=True, headers=headers),
    }
    result = client.infer(model, inputs(plan["rows"]), headers=headers)
    seen["infer"] = {
        "response": result.get_response(as_json=True),
        "churn_probability": result.as_numpy(plan["outputs"][0]).tolist(),
        "will_churn": result.as_numpy(plan["outputs"][1]).tolist(),
        "dtypes": [str(result.as_numpy(name).dtype) for name in plan["outputs"]],
    }
    one = client.infer(
        model,
        inputs(plan["rows"][:1]),
        model_version=served,
        outputs=[grpcclient.InferRequestedOutput(plan["outputs"][0])],
        request_id="triton-grpc-1",
        headers=headers,
    )
    seen["infer_one"] = {
        "response": one.get_response(as_json=True),
        "churn_probability": one.as_numpy(plan["outputs"][0]).tolist(),
    }
    seen["errors"] = {
        "bad_value": error(lambda: client.infer(model, inputs(plan["bad_rows"]), headers=headers)),
        "unknown_model": error(lambda: client.infer("churn_v0", inputs(plan["rows"][:1]), headers=headers)),
        "unknown_version": error(
            lambda: client.infer(model, inputs(plan["rows"][:1]), model_version="v0", headers=headers)
        ),
        "model_config": error(lambda: client.get_model_config(model, headers=headers)),
        "no_key": error(lambda: client.infer(model, inputs(plan["rows"][:1]))) if headers else None,
    }
    client.close()
    return seen


async def run_kserve_grpc(plan: dict[str, Any]) -> dict[str, Any]:
    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    model = plan["model"]

    def request(rows: list[dict[str, Any]], binary: bool = True, **kwargs: Any) -> InferRequest:
        tensors = []
        for name, array in columns(plan, rows).items():
            if binary:  # raw_input_contents
                tensor = InferInput(name, list(array.shape), plan["datatypes"][name])
                tensor.set_data_from_numpy(array, binary_data=True)
            else:  # typed contents (int64_contents, fp64_contents, bytes_contents)
                tensor = InferInput(name, list(array.shape), plan["datatypes"][name], data=array.tolist())
            tensors.append(tensor)
        return InferRequest(model_name=model, infer_inputs=tensors, **kwargs)

    def outputs(response: Any) -> dict[str, Any]:
        by_name = {output.name: output for output in response.outputs}
        return {
            "outputs": [output.name for output in response.outputs],
            "churn_probability": by_name[plan["outputs"][0]].as_numpy().tolist()
            if plan["outputs"][0] in by_name
            else None,
            "will_churn": by_name[plan["outputs"][1]].as_numpy().tolist() if plan["outputs"][1] in by_name else None,
        }

    async with InferenceGRPCClient(url=plan["grpc"]) as client:  # its defaults (60 s, 3 tries)
        seen: dict[str, Any] = {
            "version": version("kserve"),
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(model),
        }
        response = await client.infer(request(plan["rows"], request_id="kserve-grpc-1"))
        seen["infer"] = {"model_name": response.model_name, "id": response.id, **outputs(response)}
        seen["infer"]["parameters"] = {  # InferParameter messages, as KServe hands them over
            k: str(v) for k, v in (response.parameters or {}).items()
        }
        typed = await client.infer(request(plan["rows"], binary=False))
        seen["infer_typed"] = outputs(typed)
        selected = await client.infer(
            request(plan["rows"][:3], binary=False, request_outputs=[RequestedOutput(plan["outputs"][1])])
        )
        seen["infer_selected"] = outputs(selected)
        try:
            await client.infer(request(plan["bad_rows"]))
            seen["bad_value"] = {"status": None, "message": "no error"}
        except grpc.RpcError as exc:
            seen["bad_value"] = {"status": exc.code().name, "message": exc.details()}
    return seen


def main() -> None:
    plan = json.load(sys.stdin)
    client = sys.argv[1]
    if client == "tritonclient":
        seen = run_tritonclient(plan)
    elif client == "tritonclient_grpc":
        seen = run_tritonclient_grpc(plan)
    elif client == "kserve":
        seen = asyncio.run(run_kserve(plan))
    elif client == "kserve_grpc":
        seen = asyncio.run(run_kserve_grpc(plan))
    else:
        raise SystemExit(f"unknown client {client!r}: tritonclient, tritonclient_grpc, kserve or kserve_grpc")
    json.dump(seen, sys.stdout)


if __name__ == "__main__":
    main()
