"""The /v2 operations in the service's OpenAPI document (/docs.json), OpenAPI 3.0 as BentoML's."""

from __future__ import annotations

from typing import Any

from models.schema import EXAMPLE_CUSTOMER, FEATURE_NAMES
from models.store import MODEL_NAME
from serving.v2.codec import (
    BYTES,
    FP64,
    HEADER_INFERENCE_CONTENT_LENGTH,
    INT64,
    OUTPUTS,
    PARAM_BINARY_DATA,
    PARAM_BINARY_DATA_OUTPUT,
    PARAM_BINARY_DATA_SIZE,
    PREFIX,
    columnar_request,
)

_TAG = ["Open Inference Protocol (V2)"]
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_TENSOR_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_paths(version: str, max_rows: int) -> dict[str, Any]:
    """The /v2 operations for /docs.json."""
    version_param = [
        {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}, "example": version}
    ]
    not_found = _json(_ERROR, "unknown model or version")
    request_schema = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "shape", "datatype", "data"],
                    "properties": {
                        "name": {"type": "string", "enum": list(FEATURE_NAMES)},
                        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                        "datatype": {"type": "string", "enum": [FP64, INT64, BYTES]},
                        "parameters": {"type": "object"},
                        "data": {"type": "array"},
                    },
                },
            },
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "enum": list(OUTPUTS)}, "parameters": {"type": "object"}},
                },
            },
        },
        "example": {"id": "42", **columnar_request([EXAMPLE_CUSTOMER])},
    }
    response_schema = {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "outputs": {
                "type": "array",
                "items": {**_TENSOR_META, "properties": {**_TENSOR_META["properties"], "data": {"type": "array"}}},
            },
        },
    }
    infer = {
        "tags": _TAG,
        "summary": "Inference: churn_probability and will_churn for N customers given as columns",
        "description": (
            "One input per feature, named as the dataset column, shape [N] (or [N, 1]); FP64 or INT64 for "
            "numbers, BYTES for Geography and Gender. Values are checked as by /predict; at most "
            f"{max_rows} rows per request (BANKCHURN_MAX_BATCH_ROWS). The binary tensor data extension: "
            f"a body of a JSON header of {HEADER_INFERENCE_CONTENT_LENGTH} bytes followed by the inputs "
            f"whose parameters give a '{PARAM_BINARY_DATA_SIZE}' (little-endian INT64 / FP64; BYTES as "
            "4-byte-length-prefixed elements), in their order; outputs come as binary data when the request's "
            f"'{PARAM_BINARY_DATA_OUTPUT}' or an output's '{PARAM_BINARY_DATA}' parameter is true (the answer "
            f"then has the same framing and header), as JSON otherwise."
        ),
        "parameters": [
            {
                "name": HEADER_INFERENCE_CONTENT_LENGTH,
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
                "description": "binary tensor data extension: the length of the body's JSON header",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": request_schema},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            "200": {
                "description": "the outputs, with model_version and threshold in parameters",
                "content": {
                    "application/json": {"schema": response_schema},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "400": _json(_ERROR, "bad request: names the input and, for values, the first bad row"),
            "404": not_found,
            "413": _json(_ERROR, "body over BANKCHURN_MAX_BODY_BYTES"),
            "415": _json(_ERROR, "neither application/json nor application/octet-stream"),
            "503": _json(_ERROR, "overloaded (Retry-After) or shutting down"),
        },
    }
    metadata = {
        "tags": _TAG,
        "summary": "Model metadata: inputs and outputs with datatypes and shapes",
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "versions": {"type": "array", "items": {"type": "string"}},
                        "platform": {"type": "string"},
                        "inputs": {"type": "array", "items": _TENSOR_META},
                        "outputs": {"type": "array", "items": _TENSOR_META},
                    },
                },
                "model metadata",
            ),
            "404": not_found,
        },
    }
    ready = {
        "tags": _TAG,
        "summary": "Model readiness",
        "responses": {
            "200": _json(
                {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}, "ready"
            ),
            "404": not_found,
            "503": _json(
                {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
                "not ready",
            ),
        },
    }
    ready_flag = {"type": "object", "properties": {"ready": {"type": "boolean"}}}
    model = f"{PREFIX}/models/{MODEL_NAME}"
    versioned = f"{model}/versions/{{version}}"
    return {
        PREFIX: {
            "get": {
                "tags": _TAG,
                "summary": "Server metadata",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "version": {"type": "string"},
                                "extensions": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                        "server metadata",
                    )
                },
            }
        },
        f"{PREFIX}/health/live": {
            "get": {
                "tags": _TAG,
                "summary": "Server liveness",
                "responses": {"200": _json({"type": "object", "properties": {"live": {"type": "boolean"}}}, "live")},
            }
        },
        f"{PREFIX}/health/ready": {
            "get": {
                "tags": _TAG,
                "summary": "Server readiness (false once shutdown starts)",
                "responses": {"200": _json(ready_flag, "ready"), "503": _json(ready_flag, "not ready")},
            }
        },
        model: {"get": metadata},
        f"{model}/ready": {"get": ready},
        f"{model}/infer": {"post": infer},
        versioned: {"parameters": version_param, "get": metadata},
        f"{versioned}/ready": {"parameters": version_param, "get": ready},
        f"{versioned}/infer": {"parameters": version_param, "post": infer},
    }
