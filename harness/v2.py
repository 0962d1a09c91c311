"""Open Inference Protocol request bodies in the binary tensor data extension's framing, written
independently of the service's codec (a client's view), for tests and benchmarks."""

from __future__ import annotations

import copy
import json
import struct
from typing import Any

import numpy as np

BINARY_DATA_SIZE = "binary_data_size"
HEADER = "Inference-Header-Content-Length"


def raw_tensor(datatype: str, values: list[Any]) -> bytes:
    """Values in the raw form: little-endian INT64 / FP64 / BOOL, BYTES as 4-byte-length-prefixed elements."""
    if datatype == "BYTES":
        encoded = [v if isinstance(v, bytes) else str(v).encode() for v in values]
        return b"".join(struct.pack("<I", len(v)) + v for v in encoded)
    dtype = {"INT64": "<i8", "FP64": "<f8", "BOOL": "?"}[datatype]
    return np.asarray(values, dtype=dtype).tobytes()


def binary_parts(request: dict[str, Any], names: set[str] | None = None) -> tuple[dict[str, Any], list[bytes]]:
    """A JSON request with the data of the named inputs (all by default) moved out of it: the
    JSON header (each moved input with its binary_data_size) and the inputs' bytes, in order."""
    head = copy.deepcopy(request)
    blobs = []
    for tensor in head["inputs"]:
        if names is None or tensor["name"] in names:
            blob = raw_tensor(tensor["datatype"], tensor.pop("data"))
            tensor.setdefault("parameters", {})[BINARY_DATA_SIZE] = len(blob)
            blobs.append(blob)
    return head, blobs


def binary_body(head: dict[str, Any], blobs: list[bytes], header_length: int | str | None = None) -> dict[str, Any]:
    """httpx request arguments for a binary request: the JSON header then the blobs; the header
    gives the JSON part's length (or what the caller says)."""
    header = json.dumps(head).encode()
    length = len(header) if header_length is None else header_length
    return {"content": header + b"".join(blobs), "headers": {HEADER: str(length)}}


def binary_request(request: dict[str, Any], names: set[str] | None = None) -> dict[str, Any]:
    return binary_body(*binary_parts(request, names))


def read_binary_response(content: bytes, header_length: str | None) -> dict[str, Any]:
    """A response in either form, outputs' `data` filled in from the binary part when there is one."""
    if header_length is None:
        return json.loads(content)
    n = int(header_length)
    response = json.loads(content[:n])
    offset = n
    for output in response["outputs"]:
        size = output.get("parameters", {}).get(BINARY_DATA_SIZE)
        if size is not None:
            dtype = {"FP64": "<f8", "BOOL": "?"}[output["datatype"]]
            output["data"] = np.frombuffer(content[offset : offset + size], dtype=dtype).tolist()
            offset += size
    assert offset == len(content), (offset, len(content))
    return response
