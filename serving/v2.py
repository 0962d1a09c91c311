"""The Open Inference Protocol (KServe V2) REST API under /v2, as a hot route (serving.edge).

    GET  /v2                                   server metadata
    GET  /v2/health/live                       liveness
    GET  /v2/health/ready                      readiness (the service's own: false once shutdown starts)
    GET  /v2/models/bank_churn                 model metadata: the 10 inputs and 2 outputs
    GET  /v2/models/bank_churn/ready           model readiness
    POST /v2/models/bank_churn/infer           inference
    ... and the same three under /v2/models/bank_churn/versions/<served version>

Inference is columnar: one input per feature, named as the dataset column, shape [N] (or
[N, 1]), datatype FP64 or INT64 for numbers and BYTES for Geography and Gender; the outputs
are churn_probability (FP64 [N]) and will_churn (BOOL [N]). Values are checked by the one
schema (models.columns.validate_columns) with /predict's rules and wording; what is V2's own
(datatypes, shapes, framing) is checked here. Everything goes as JSON: the binary tensor,
shared-memory and classification extensions are refused with a 400 saying so.

The usual single-row request is accepted the short way and joins /predict's micro-batches:
decoded and bounds-checked from its bytes by msgspec (fast_single_row, ~11 us against ~27 us
for orjson + Python checks; it took V2 from ~0.89x to ~1.0x /predict's req/s at 50
connections), or else from the parsed JSON (single_row: /predict's compiled request model
checks the values); anything else goes the columns way (checked_columns), which also words
every error. Small bodies are parsed on the event loop (cheaper than a thread hop), bodies over INLINE_BODY_BYTES on the engine's pool,
like /predict_batch. Nothing is ever allocated by a shape a client claims: shapes are
checked against the data that arrived.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import msgspec
import numpy as np
import orjson
import pydantic
from starlette.types import Receive, Scope, Send

from models.columns import FEW_ROWS, validate_columns
from models.schema import (
    BY_NAME,
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    NUMERIC_FEATURES,
    Customer,
)
from models.store import MODEL_NAME
from serving import telemetry
from serving.concurrency import Overloaded
from serving.edge import RETRY_AFTER, HttpError, overloaded, read_body, send_json
from serving.engine import Engine

PREFIX = "/v2"
SERVER_NAME = "bentoml"
# Datatypes (the protocol's tensor data types that this model takes and gives).
FP64 = "FP64"
INT64 = "INT64"
BYTES = "BYTES"
BOOL = "BOOL"
OUTPUT_PROBABILITY = "churn_probability"
OUTPUT_DECISION = "will_churn"
OUTPUTS = {OUTPUT_PROBABILITY: FP64, OUTPUT_DECISION: BOOL}
# The datatype each input declares in the model metadata, and the ones it accepts: a number
# may come as either (an FP64 value of an integer feature must be integral, checked by the schema).
INPUT_DATATYPES = {
    n: BYTES if BY_NAME[n].kind == "category" else INT64 if BY_NAME[n].kind != "float" else FP64 for n in FEATURE_NAMES
}
ACCEPTED_DATATYPES = {n: (BYTES,) if BY_NAME[n].kind == "category" else (FP64, INT64) for n in FEATURE_NAMES}
# Response parameters.
PARAM_MODEL_VERSION = "model_version"  # the served model-store tag, as /predict's model_version
PARAM_THRESHOLD = "threshold"  # will_churn = churn_probability >= threshold
# Extensions this server does not implement, and how clients ask for them.
HEADER_INFERENCE_CONTENT_LENGTH = "Inference-Header-Content-Length"
_BINARY_HEADER = HEADER_INFERENCE_CONTENT_LENGTH.lower().encode()
PARAM_BINARY_DATA_SIZE = "binary_data_size"
PARAM_SHARED_MEMORY_REGION = "shared_memory_region"
PARAM_CLASSIFICATION = "classification"
BINARY_UNSUPPORTED = (
    "the binary tensor data extension is not supported (Inference-Header-Content-Length header, "
    "binary_data_size parameter, application/octet-stream body): send every input as JSON 'data' "
    "(tritonclient: set_data_from_numpy(..., binary_data=False))"
)
SHARED_MEMORY_UNSUPPORTED = "the shared-memory extension is not supported: send every input as JSON 'data'"
CLASSIFICATION_UNSUPPORTED = "the classification extension is not supported: request the outputs themselves"
# Bodies up to this size are parsed and checked on the event loop, bigger ones on the engine's
# pool (a thread hop costs more than a small body). Measured on the shared 2-core machine
# (CPU time): 1 row (670 B) 18 us, 100 rows (5.5 KiB) 0.2 ms, 300 rows (15 KiB) 0.5 ms,
# 1,000 rows (49 KiB) 1.7 ms.
INLINE_BODY_BYTES = 16 * 1024

# model_name: KServe's client sends it (it must name this model)
REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs", "model_name"})
INPUT_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
OUTPUT_FIELDS = frozenset({"name", "parameters"})
_HEAD = "HEAD"


def _quote(value: Any, limit: int = 50) -> str:
    """A client's string in a message, cut short: names and paths can be megabytes long."""
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _bad(message: str) -> HttpError:
    return HttpError(400, message)


# ------------------------------------------------------------------ request parsing (sync, pure)


@dataclass
class InferRequest:
    """A parsed and checked inference request: one row, or columns."""

    id: str | None
    outputs: tuple[str, ...]
    row: tuple | None = None  # a single row, as the micro-batcher takes it (FEATURE_NAMES order)
    numeric: np.ndarray | None = None  # float64 [n, len(NUMERIC_FEATURES)]
    categorical: dict[str, np.ndarray] | None = None


def _parameters(obj: dict, where: str) -> dict:
    parameters = obj.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise _bad(f"{where}: 'parameters' must be a JSON object")
    return parameters


def _rows(shape: Any) -> int | None:
    """N of a column's shape, [N] or [N, 1]; None for any other shape."""
    if type(shape) is not list or not 1 <= len(shape) <= 2 or (len(shape) == 2 and shape[1] != 1):
        return None
    n = shape[0]
    return n if type(n) is int and n >= 0 else None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"the string {_quote(value, 20)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a number"


def _column_shapes(shape: list, n: int) -> tuple[tuple[int, ...], ...]:
    """The array shapes a column's data may have: flat, or nested as [[v], ...] for shape [N, 1]."""
    return ((n,), (n, 1)) if len(shape) == 2 else ((n,),)


def _flat(data: list) -> list:
    """Data of a [N, 1] column given in its nested form, flattened (for messages only)."""
    return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in data]


def _numbers(name: str, datatype: str, data: list, shape: list, n: int, may_have_bools: bool) -> np.ndarray:
    """An FP64/INT64 column as float64 [n], converted by NumPy in one call (no loop per value)."""
    try:
        array = np.array(data)  # NumPy infers int64/uint64, float64, or something that is not numbers
    except (ValueError, TypeError):  # ragged nesting
        array = None
    if array is None or array.shape not in _column_shapes(shape, n):
        raise _bad(f"input '{name}': data does not have shape {shape} (a column: N values, flat or as [[v], ...])")
    bad = None
    if array.dtype.kind not in "iuf":  # strings, booleans, nulls, objects
        found = (i for i, v in enumerate(_flat(data)) if isinstance(v, bool) or not isinstance(v, int | float))
        row = next(found, 0)
        bad = (row, _flat(data)[row])
    elif may_have_bools:  # NumPy turns true into 1 next to numbers: look for booleans themselves
        bad = next(((i, v) for i, v in enumerate(_flat(data)) if isinstance(v, bool)), None)
    if bad is not None:
        raise _bad(f"input '{name}', row {bad[0]}: {datatype} data must be JSON numbers, found {_json_type(bad[1])}")
    array = array.reshape(n)
    if datatype == INT64 and array.dtype.kind == "f":
        fractional = np.flatnonzero(array != np.floor(array))
        if len(fractional):
            row = int(fractional[0])
            raise _bad(
                f"input '{name}', row {row}: INT64 data must be integers, found {array[row].item()!r} (send FP64)"
            )
    return array.astype(np.float64, copy=False)


def _strings(name: str, data: list, shape: list, n: int) -> np.ndarray:
    """A BYTES column as an object array [n]; what is not a category string fails the schema check."""
    try:
        array = np.array(data, dtype=object)
    except ValueError:
        array = None
    if array is None or array.shape not in _column_shapes(shape, n):
        raise _bad(f"input '{name}': data does not have shape {shape} (a column: N values, flat or as [[v], ...])")
    return array.reshape(n)


def _requested_outputs(request: dict) -> tuple[str, ...]:
    outputs = request.get("outputs")
    if outputs is None or outputs == []:
        return tuple(OUTPUTS)
    if not isinstance(outputs, list):
        raise _bad("'outputs' must be a JSON array of {\"name\": ...} objects")
    names: list[str] = []
    for i, output in enumerate(outputs):
        if not isinstance(output, dict):
            raise _bad(f"outputs[{i}] must be a JSON object with a 'name'")
        unknown = output.keys() - OUTPUT_FIELDS
        if unknown:
            raise _bad(f"outputs[{i}]: unknown field {_quote(sorted(unknown)[0])} (allowed: name, parameters)")
        name = output.get("name")
        if type(name) is not str or name not in OUTPUTS:  # (a dict is no key: found by the fuzzing)
            raise _bad(f"outputs[{i}]: unknown output {_quote(name)} (outputs: {', '.join(OUTPUTS)})")
        if name in names:
            raise _bad(f"output '{name}' is requested twice")
        parameters = _parameters(output, f"output '{name}'")
        if PARAM_CLASSIFICATION in parameters:
            raise _bad(CLASSIFICATION_UNSUPPORTED)
        if PARAM_SHARED_MEMORY_REGION in parameters:
            raise _bad(SHARED_MEMORY_UNSUPPORTED)
        # 'binary_data': true (tritonclient's default) is a preference: the answer is JSON, which
        # every client reads, since each output says how it is sent.
        names.append(name)
    return tuple(names)


def parse_request(body: bytes, max_rows: int) -> InferRequest:
    """Parse and check an inference request body. Raises HttpError(400) naming what is wrong."""
    fast = fast_single_row(body)
    if fast is not None:
        return fast
    if not body:
        raise _bad('empty body: send an inference request, {"inputs": [...]}')
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"invalid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise _bad('the body must be a JSON object: an inference request, {"inputs": [...]}')
    if not REQUEST_FIELDS.issuperset(request):
        unknown = sorted(request.keys() - REQUEST_FIELDS)[0]
        raise _bad(
            f"unknown field {_quote(unknown)} in the inference request (allowed: id, parameters, inputs, outputs)"
        )
    if request.get("model_name", MODEL_NAME) != MODEL_NAME:
        raise _bad(f"'model_name' {_quote(request['model_name'])} does not match the URL's model '{MODEL_NAME}'")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    _parameters(request, "the inference request")  # server-specific hints (e.g. binary_data_output): ignored
    outputs = _requested_outputs(request)

    inputs = request.get("inputs")
    row = single_row(inputs)
    if row is not None:
        return InferRequest(request_id, outputs, row=row)
    return checked_columns(body, inputs, request_id, outputs, max_rows)


def _single_row_decoder() -> tuple[msgspec.json.Decoder, dict[type, str]]:
    """A decoder for the usual single-row request, straight from its bytes, and the feature
    each input struct stands for: ten inputs (tagged by name) of shape [1], an accepted
    datatype and one value within the schema's bounds; no unknown fields, no strings or
    booleans for numbers. What it accepts, single_row accepts as the same row; everything
    else takes the long way, which words any error."""
    inputs = []
    for name in FEATURE_NAMES:
        feat = BY_NAME[name]
        if feat.kind == "category":
            value: Any = Literal[feat.categories]  # type: ignore[valid-type]
        elif feat.kind == "float":  # an int stays an int, as single_row keeps it
            bounds = {"ge": feat.minimum, "le": feat.maximum}
            value = Annotated[int, msgspec.Meta(**bounds)] | Annotated[float, msgspec.Meta(**bounds)]
        else:  # an integral float for an integer feature takes the long way
            lo, hi = (0, 1) if feat.kind == "flag" else (int(feat.minimum), int(feat.maximum))
            value = Annotated[int, msgspec.Meta(ge=lo, le=hi)]
        fields = [
            ("shape", tuple[Literal[1]]),
            ("datatype", Literal[ACCEPTED_DATATYPES[name]]),  # type: ignore[valid-type]
            ("data", tuple[value]),  # type: ignore[valid-type]
        ]
        inputs.append(msgspec.defstruct(f"V2Row{name}", fields, tag_field="name", tag=name, forbid_unknown_fields=True))
    request = msgspec.defstruct(
        "V2SingleRowRequest",
        [
            ("inputs", Annotated[list[Union[tuple(inputs)]], msgspec.Meta(min_length=10, max_length=10)]),  # noqa: UP007
            ("id", str | None, None),
            ("model_name", Literal[MODEL_NAME], MODEL_NAME),  # type: ignore[valid-type]
            ("parameters", dict | None, None),
            ("outputs", Any, None),  # checked and worded by _requested_outputs
        ],
        forbid_unknown_fields=True,
    )
    return msgspec.json.Decoder(request), {cls: name for cls, name in zip(inputs, FEATURE_NAMES, strict=True)}


_SINGLE_ROW, _SINGLE_ROW_NAMES = _single_row_decoder()  # the decoder; each input struct -> its feature
SINGLE_ROW_BODY_BYTES = 4096  # a single-row request is ~700 bytes: bigger bodies skip the short way


def fast_single_row(body: bytes) -> InferRequest | None:
    """The usual single-row request from its bytes, decoded and checked against the schema's
    bounds and categories by msgspec in one call (~2.5x cheaper than orjson + single_row);
    None for anything else (parse_request then reads it the long way and words any error).
    tests/test_v2.py holds it to accept only what checked_columns accepts, as the same row."""
    if len(body) > SINGLE_ROW_BODY_BYTES:
        return None
    try:
        request = _SINGLE_ROW.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    values = {}
    for item in request.inputs:
        v = item.data[0]
        if type(v) is float and item.datatype == INT64:
            return None  # checked_columns accepts an integral one, after its own check
        values[_SINGLE_ROW_NAMES[type(item)]] = v
    if len(values) != len(FEATURE_NAMES):  # a name given twice
        return None
    return InferRequest(
        request.id, _requested_outputs({"outputs": request.outputs}), row=tuple(values[n] for n in FEATURE_NAMES)
    )


def single_row(inputs: Any) -> tuple | None:
    """The usual single-row request, accepted the short way: ten inputs of exactly name, shape
    [1], an accepted datatype and one plain value, which /predict's own request model (Customer,
    compiled validation) accepts. Anything else, None: checked_columns decides, and words any error.
    Never accepts what checked_columns refuses (tests/test_v2.py holds them to the same rows)."""
    if type(inputs) is not list or len(inputs) != len(FEATURE_NAMES):
        return None
    values: dict[str, Any] = {}
    try:
        for item in inputs:
            if len(item) != 4:  # name, shape, datatype, data: no parameters, nothing unknown
                return None
            name, shape, datatype, data = item["name"], item["shape"], item["datatype"], item["data"]
            if (
                type(shape) is not list
                or len(shape) != 1
                or shape[0] != 1
                or type(shape[0]) is not int
                or datatype not in ACCEPTED_DATATYPES[name]
                or type(data) is not list
                or len(data) != 1
            ):
                return None
            v = data[0]
            if datatype != BYTES:
                if type(v) is float:
                    if datatype == INT64:
                        return None  # checked_columns accepts an integral one, after its own check
                    if name in _INTEGER_FEATURES and v.is_integer():
                        v = int(v)  # an integral FP64 value of an integer feature is that integer
                elif type(v) is not int:  # bool, str, None, ...: checked_columns says what is wrong
                    return None
            values[name] = v
    except (KeyError, TypeError):  # not a dict, a missing field, an unknown or unhashable name
        return None
    if len(values) != len(FEATURE_NAMES):  # a name given twice
        return None
    try:
        Customer.model_validate(values)
    except pydantic.ValidationError:
        return None
    return tuple(values[n] for n in FEATURE_NAMES)


def checked_columns(
    body: bytes, inputs: Any, request_id: str | None, outputs: tuple[str, ...], max_rows: int
) -> InferRequest:
    """Any inference request's inputs, as columns checked by the schema; or the 400 saying why not."""
    if not isinstance(inputs, list) or not inputs:
        raise _bad(f"'inputs' must be a JSON array with one input per feature ({', '.join(FEATURE_NAMES)})")
    given: dict[str, tuple[str, list, list]] = {}  # name -> (datatype, shape, data)
    rows = first = None
    for i, item in enumerate(inputs):
        if type(item) is not dict:
            raise _bad(f"inputs[{i}] must be a JSON object with name, shape, datatype and data")
        name = item.get("name")
        if type(name) is not str or name not in BY_NAME:
            raise _bad(f"inputs[{i}]: unknown input {_quote(name)} (inputs: {', '.join(FEATURE_NAMES)})")
        if name in given:
            raise _bad(f"input '{name}' is given twice")
        if not INPUT_FIELDS.issuperset(item):
            unknown = sorted(item.keys() - INPUT_FIELDS)[0]
            raise _bad(
                f"input '{name}': unknown field {_quote(unknown)} (allowed: name, shape, datatype, parameters, data)"
            )
        if "parameters" in item:
            parameters = _parameters(item, f"input '{name}'")
            if PARAM_BINARY_DATA_SIZE in parameters:
                raise _bad(BINARY_UNSUPPORTED)
            if PARAM_SHARED_MEMORY_REGION in parameters:
                raise _bad(SHARED_MEMORY_UNSUPPORTED)
        datatype = item.get("datatype")
        if datatype not in ACCEPTED_DATATYPES[name]:
            allowed = " or ".join(ACCEPTED_DATATYPES[name])
            raise _bad(f"input '{name}': datatype {_quote(datatype)} is not accepted (allowed: {allowed})")
        shape = item.get("shape")
        n = shape[0] if type(shape) is list and len(shape) == 1 and type(shape[0]) is int else _rows(shape)
        if n is None or n < 0:
            raise _bad(f"input '{name}': shape {str(shape)[:50]} is not a column's; send [N] (or [N, 1]) for N rows")
        if rows is None:
            rows, first = n, name
            if n == 0:
                raise _bad(f"input '{name}': shape {shape}: send at least 1 row")
            if n > max_rows:
                raise _bad(f"input '{name}': shape {shape}: at most {max_rows} rows per request")
        elif n != rows:
            raise _bad(
                f"input '{name}' has {n} rows but input '{first}' has {rows}: every input is one column of the same rows"
            )
        data = item.get("data")
        if type(data) is not list:
            raise _bad(f"input '{name}': 'data' must be a JSON array of the column's {n} values")
        if len(data) != n:
            raise _bad(f"input '{name}': shape {shape} needs {n} values, data has {len(data)}")
        given[name] = (datatype, shape, data)
    missing = [n for n in FEATURE_NAMES if n not in given]
    if missing:
        raise _bad(f"missing input(s): {', '.join(missing)} (every feature is one input)")

    # JSON booleans can only be these bytes; NumPy would read them as 1 and 0 next to numbers.
    may_have_bools = b"true" in body or b"false" in body
    columns = _numeric_columns(given, rows, may_have_bools)
    for name in CATEGORICAL_FEATURES:
        _, shape, data = given[name]
        # a few flat values go as they are (the schema checks each); else an object array
        columns[name] = data if rows <= FEW_ROWS and len(shape) == 1 else _strings(name, data, shape, rows)
    if rows == 1:
        row = _valid_row(columns)
        if row is not None:
            return InferRequest(request_id, outputs, row=row)
    checked = validate_columns(columns)
    if checked.errors:
        raise _bad(describe_value_errors(checked.errors))
    return InferRequest(request_id, outputs, numeric=checked.numeric, categorical=checked.categorical)


_INTEGER_FEATURES = frozenset(n for n in NUMERIC_FEATURES if BY_NAME[n].kind in ("int", "flag"))


def _valid_row(columns: dict[str, list | np.ndarray]) -> tuple | None:
    """A single row that /predict's own request model (Customer, compiled validation) accepts,
    as a row tuple; None if it does not (validate_columns then says why, in its words). For one
    row this is ~7x cheaper than checking value by value in Python. An integral FP64 value of
    an integer feature is that integer (the model is strict: JSON 42.0 is no integer to it)."""
    values = {}
    for name in FEATURE_NAMES:
        column = columns[name]
        if type(column) is not list:
            return None
        v = column[0]
        values[name] = int(v) if name in _INTEGER_FEATURES and type(v) is float and v.is_integer() else v
    try:
        Customer.model_validate(values)
    except pydantic.ValidationError:
        return None
    return tuple(values.values())


def _numeric_columns(given: dict[str, tuple[str, list, list]], n: int, may_have_bools: bool) -> dict[str, np.ndarray]:
    """The numeric inputs as columns: a few flat rows of plain numbers as the lists they came
    in; more rows as float64, all columns converted by NumPy in one call when they are flat and
    plainly numbers (the usual request); else column by column, which finds what is wrong."""
    flat = all(len(given[name][1]) == 1 for name in NUMERIC_FEATURES)
    if flat and n <= FEW_ROWS:
        columns = {}
        for name in NUMERIC_FEATURES:
            datatype, shape, data = given[name]
            for v in data:  # type() is, not isinstance(): True is no number here
                if not (type(v) is int or (type(v) is float and (datatype == FP64 or v.is_integer()))):
                    columns[name] = _numbers(name, datatype, data, shape, n, may_have_bools)  # says what is wrong
                    break
            else:
                columns[name] = data
        return columns
    if not may_have_bools and flat:
        try:
            matrix = np.array([given[name][2] for name in NUMERIC_FEATURES])
        except (ValueError, TypeError):
            matrix = None
        if matrix is not None and matrix.dtype.kind in "iuf" and matrix.shape == (len(NUMERIC_FEATURES), n):
            integral = True
            if matrix.dtype.kind == "f":  # INT64 inputs must hold integers
                declared = np.array([given[name][0] == INT64 for name in NUMERIC_FEATURES])
                integral = not (declared[:, None] & (matrix != np.floor(matrix))).any()
            if integral:
                matrix = matrix.astype(np.float64, copy=False)
                return {name: matrix[j] for j, name in enumerate(NUMERIC_FEATURES)}
    columns = {}
    for name in NUMERIC_FEATURES:
        datatype, shape, data = given[name]
        columns[name] = _numbers(name, datatype, data, shape, n, may_have_bools)
    return columns


def _more(rows: int) -> str:
    return "" if rows == 0 else f" (and {rows} more row{'s' if rows > 1 else ''})"


def describe_value_errors(errors: list[tuple[int, str, str]]) -> str:
    """ "input 'Age', row 3: ... (allowed: ...)": the first bad row of each input, in row order."""
    first: dict[str, tuple[int, str]] = {}
    counts: dict[str, int] = {}
    for row, feature, message in errors:
        first.setdefault(feature, (row, message))
        counts[feature] = counts.get(feature, 0) + 1
    return "; ".join(
        f"input '{feature}', row {row}: {message}" + _more(counts[feature] - 1)
        for feature, (row, message) in first.items()
    )


# ------------------------------------------------------------------ the ASGI app


class OpenInferenceApp:
    """The /v2 routes: an ASGI app for RouteTable.mount(PREFIX, ...), answering its own 404/405s."""

    def __init__(
        self,
        engine: Engine,
        ready: Callable[[], bool],
        max_body_bytes: int,
        max_rows: int,
        server_version: str | None = None,
    ):
        self.engine = engine
        self.ready = ready
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows
        self.version = engine.predictor.bundle.version
        self.parameters = {PARAM_MODEL_VERSION: engine.tag, PARAM_THRESHOLD: engine.threshold}
        self.server_metadata_body = orjson.dumps(
            {"name": SERVER_NAME, "version": server_version or importlib.metadata.version("bentoml"), "extensions": []}
        )
        self.model_metadata_body = orjson.dumps(
            {
                "name": MODEL_NAME,
                "versions": [self.version],
                "platform": "onnxruntime_onnx" if engine.predictor.backend == "onnxruntime" else "sklearn",
                "inputs": [{"name": n, "datatype": INPUT_DATATYPES[n], "shape": [-1]} for n in FEATURE_NAMES],
                "outputs": [{"name": n, "datatype": d, "shape": [-1]} for n, d in OUTPUTS.items()],
            }
        )
        # path -> (metrics label, method, handler): one dict lookup routes a request
        self.routes: dict[str, tuple[str, str, Callable]] = {
            PREFIX: (PREFIX, "GET", self.server_metadata),
            f"{PREFIX}/": (PREFIX, "GET", self.server_metadata),
            f"{PREFIX}/health/live": (f"{PREFIX}/health/live", "GET", self.live),
            f"{PREFIX}/health/ready": (f"{PREFIX}/health/ready", "GET", self.server_ready),
        }
        for path, label in (
            (f"{PREFIX}/models/{MODEL_NAME}", f"{PREFIX}/models/{{model}}"),
            (
                f"{PREFIX}/models/{MODEL_NAME}/versions/{self.version}",
                f"{PREFIX}/models/{{model}}/versions/{{version}}",
            ),
        ):
            self.routes[path] = (label, "GET", self.model_metadata)
            self.routes[f"{path}/ready"] = (f"{label}/ready", "GET", self.model_ready)
            self.routes[f"{path}/infer"] = (f"{label}/infer", "POST", self.infer)

    # ------------------------------------------------------------ routing

    def route_label(self, scope: Scope) -> str:
        """The metrics label of a request: a template, whatever model or version the path names."""
        hit = self.routes.get(scope["path"])
        if hit is not None:
            return hit[0]
        parts = scope["path"].split("/")  # ["", "v2", "models", <model>, ...]
        if len(parts) < 4 or parts[2] != "models":
            return f"{PREFIX}/{{unknown}}"
        label, rest = f"{PREFIX}/models/{{model}}", parts[4:]
        if rest[:1] == ["versions"] and len(rest) >= 2:
            label, rest = f"{label}/versions/{{version}}", rest[2:]
        if not rest or rest == [""]:
            return label
        return f"{label}/{rest[0]}" if len(rest) == 1 and rest[0] in ("ready", "infer") else f"{PREFIX}/{{unknown}}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hit = self.routes.get(scope["path"])
        if hit is None:
            raise self._not_found(scope["path"])
        _, method, handler = hit
        if scope["method"] != method and not (scope["method"] == _HEAD and method == "GET"):
            allow = "GET, HEAD" if method == "GET" else method
            raise HttpError(
                405,
                f"method {_quote(scope['method'], 20)} is not allowed on {scope['path']} (allowed: {allow})",
                headers={"Allow": allow},
            )
        await handler(scope, receive, send)

    def _not_found(self, path: str) -> HttpError:
        parts = path.split("/")
        if len(parts) >= 4 and parts[2] == "models" and parts[3]:
            if parts[3] != MODEL_NAME:
                return HttpError(404, f"unknown model {_quote(parts[3])}: this server serves '{MODEL_NAME}'")
            if len(parts) >= 6 and parts[4] == "versions" and parts[5] != self.version:
                return HttpError(
                    404,
                    f"model '{MODEL_NAME}' has no version {_quote(parts[5])}: the served version is '{self.version}'",
                )
        return HttpError(404, f"no Open Inference Protocol endpoint at {_quote(path, 100)}")

    # ------------------------------------------------------------ health and metadata

    async def server_metadata(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, self.server_metadata_body)

    async def live(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"live": True})

    async def server_ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        ready = bool(self.ready())
        await send_json(send, 200 if ready else 503, {"ready": ready})

    async def model_metadata(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, self.model_metadata_body)

    async def model_ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        ready = bool(self.ready())
        await send_json(send, 200 if ready else 503, {"name": MODEL_NAME, "ready": ready})

    # ------------------------------------------------------------ inference

    async def infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        media = ""
        for key, value in scope["headers"]:  # one pass over the headers for both checks
            if key == b"content-type":
                media = value.decode("latin-1").split(";")[0].strip().lower()
            elif key == _BINARY_HEADER:
                raise _bad(BINARY_UNSUPPORTED)
        if media == "application/octet-stream":
            raise _bad(BINARY_UNSUPPORTED)
        if media not in ("", "application/json"):
            raise HttpError(415, f"Content-Type {media[:50]!r} is not supported; send application/json")
        if not self.ready():
            raise HttpError(
                503, "not ready: the service is shutting down; retry on another replica", headers=RETRY_AFTER
            )
        body = await read_body(scope, receive, self.max_body_bytes)
        try:
            if len(body) <= INLINE_BODY_BYTES:
                request = parse_request(body, self.max_rows)
            else:  # parsing a big body would hold up every other request on the loop
                request = await self.engine.pool.run(parse_request, body, self.max_rows)
            telemetry.record_since_request_start("validate")
            if request.row is not None:  # joins concurrent /predict calls in one model call
                proba = [await self.engine.predict_one(request.row)]
            else:
                proba = await self.engine.predict_columns(request.numeric, request.categorical)
        except Overloaded as exc:
            raise overloaded(exc) from None
        await send_json(send, 200, self.response(request, proba))

    def response(self, request: InferRequest, proba: np.ndarray | list[float]) -> bytes:
        shape = [len(proba)]
        outputs = []
        threshold = self.engine.threshold
        for name in request.outputs:
            if name == OUTPUT_PROBABILITY:
                data = proba
            else:
                data = [p >= threshold for p in proba] if type(proba) is list else proba >= threshold
            outputs.append({"name": name, "datatype": OUTPUTS[name], "shape": shape, "data": data})
        body: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": self.version}
        if request.id is not None:
            body["id"] = request.id
        body["parameters"] = self.parameters
        body["outputs"] = outputs
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    # ------------------------------------------------------------ OpenAPI

    def openapi_paths(self) -> dict[str, Any]:
        return openapi_paths(self.version, self.max_rows)


# ------------------------------------------------------------------ OpenAPI description

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


def columnar_request(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An inference request for customers (dataset rows as JSON): one [N] input per feature."""
    return {
        "inputs": [
            {"name": n, "shape": [len(rows)], "datatype": INPUT_DATATYPES[n], "data": [r[n] for r in rows]}
            for n in FEATURE_NAMES
        ]
    }


def openapi_paths(version: str, max_rows: int) -> dict[str, Any]:
    """The /v2 operations for /docs.json (OpenAPI 3.0, as BentoML's document)."""
    from models.schema import EXAMPLE_CUSTOMER

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
            "numbers, BYTES for Geography and Gender. JSON data only (no binary extension). Values are "
            f"checked as by /predict; at most {max_rows} rows per request (BANKCHURN_MAX_BATCH_ROWS)."
        ),
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
        "responses": {
            "200": _json(response_schema, "the outputs, with model_version and threshold in parameters"),
            "400": _json(_ERROR, "bad request: names the input and, for values, the first bad row"),
            "404": not_found,
            "413": _json(_ERROR, "body over BANKCHURN_MAX_BODY_BYTES"),
            "415": _json(_ERROR, "not application/json"),
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
