"""The Open Inference Protocol's tensors to checked columns and back, for REST and gRPC alike.

Inference is columnar: one input per feature, named as the dataset column, shape [N] (or
[N, 1]), datatype FP64 or INT64 for numbers and BYTES for Geography and Gender; the outputs
are churn_probability (FP64 [N]) and will_churn (BOOL [N]). An input's data arrives as JSON
values (REST `data`), as raw little-endian bytes (REST's binary tensor data extension, gRPC's
raw_input_contents) or as typed values (gRPC `contents`); every form becomes the same columns.
Values are checked by the one schema (models.columns.validate_columns) with /predict's rules
and wording; what is the protocol's own (datatypes, shapes, framing, lengths) is checked here,
and raises BadRequest, which REST answers with 400 and gRPC with INVALID_ARGUMENT.

Nothing is allocated by a shape or a length a client claims: a shape is checked against the
row limit and the data that arrived, and every binary length against the others and the body
before a byte of it is read.

A single row joins /predict's micro-batches (InferRequest.row). One short way per wire format
for the usual single-row request, each held by the tests to the columns way's rows: JSON
decoded and bounds-checked from its bytes by msgspec (fast_single_row, ~11 us against ~27 us
for orjson + Python checks), protobuf read field by field (grpc.fast_row: no columns built);
anything else goes the columns way (checked_columns, columns_from_tensors), which also words
every error, and a single row found valid there (valid_row, /predict's compiled request model)
joins the batcher too.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import msgspec
import numpy as np
import orjson
import pydantic

from models.columns import FEW_ROWS, validate_columns
from models.schema import BY_NAME, CATEGORICAL_FEATURES, FEATURE_NAMES, NUMERIC_FEATURES, Customer
from models.store import MODEL_NAME

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
# Little-endian element types of the raw (binary) forms.
RAW_DTYPES = {INT64: np.dtype("<i8"), FP64: np.dtype("<f8"), BOOL: np.dtype("?")}
# Response parameters.
PARAM_MODEL_VERSION = "model_version"  # the served model-store tag, as /predict's model_version
PARAM_THRESHOLD = "threshold"  # will_churn = churn_probability >= threshold
# The binary tensor data extension (REST): the body is a JSON header of this many bytes followed
# by the binary inputs, each `binary_data_size` bytes, in the order of the inputs that have one.
HEADER_INFERENCE_CONTENT_LENGTH = "Inference-Header-Content-Length"
PARAM_BINARY_DATA_SIZE = "binary_data_size"
PARAM_BINARY_DATA = "binary_data"  # an output's: send it binary (true) or as JSON (false)
PARAM_BINARY_DATA_OUTPUT = "binary_data_output"  # the request's: the default of every output
# Extensions this server does not implement, and how clients ask for them.
PARAM_SHARED_MEMORY_REGION = "shared_memory_region"
PARAM_CLASSIFICATION = "classification"
SHARED_MEMORY_UNSUPPORTED = "the shared-memory extension is not supported: send every input's data in the request"
CLASSIFICATION_UNSUPPORTED = "the classification extension is not supported: request the outputs themselves"
EXTENSIONS = ("binary_tensor_data",)  # what server metadata lists

# model_name: KServe's client sends it (it must name this model)
REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs", "model_name"})
INPUT_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
OUTPUT_FIELDS = frozenset({"name", "parameters"})


class BadRequest(ValueError):
    """A request the protocol or the schema refuses; the message names the input and the problem."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _quote(value: Any, limit: int = 50) -> str:
    """A client's string in a message, cut short: names and paths can be megabytes long."""
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


_bad = BadRequest


# ------------------------------------------------------------------ request parsing (sync, pure)


@dataclass
class InferRequest:
    """A parsed and checked inference request: one row, or columns."""

    id: str | None
    outputs: tuple[str, ...]
    row: tuple | None = None  # a single row, as the micro-batcher takes it (FEATURE_NAMES order)
    numeric: np.ndarray | None = None  # float64 [n, len(NUMERIC_FEATURES)]
    categorical: dict[str, np.ndarray] | None = None
    binary: frozenset[str] = frozenset()  # outputs to send as binary data (REST)


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


def _flag(parameters: dict, key: str, where: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if type(value) is not bool:
        raise _bad(f"{where}: parameter '{key}' must be true or false")
    return value


def requested_outputs(outputs: Any, binary_default: bool = False) -> tuple[tuple[str, ...], frozenset[str]]:
    """The outputs a request names (all when none), and which of them to send as binary data:
    an output's own `binary_data` parameter, else the request's `binary_data_output`."""
    if outputs is None or outputs == []:
        return tuple(OUTPUTS), frozenset(OUTPUTS) if binary_default else frozenset()
    if not isinstance(outputs, list):
        raise _bad("'outputs' must be a JSON array of {\"name\": ...} objects")
    names: list[str] = []
    binary: set[str] = set()
    for i, output in enumerate(outputs):
        if not isinstance(output, dict):
            raise _bad(f"outputs[{i}] must be a JSON object with a 'name'")
        unknown = output.keys() - OUTPUT_FIELDS
        if unknown:
            raise _bad(f"outputs[{i}]: unknown field {_quote(sorted(unknown)[0])} (allowed: name, parameters)")
        name = output.get("name")
        if type(name) is not str or name not in OUTPUTS:  # an unhashable name (a dict) is no output either
            raise _bad(f"outputs[{i}]: unknown output {_quote(name)} (outputs: {', '.join(OUTPUTS)})")
        if name in names:
            raise _bad(f"output '{name}' is requested twice")
        parameters = _parameters(output, f"output '{name}'")
        if PARAM_CLASSIFICATION in parameters:
            raise _bad(CLASSIFICATION_UNSUPPORTED)
        if PARAM_SHARED_MEMORY_REGION in parameters:
            raise _bad(SHARED_MEMORY_UNSUPPORTED)
        if _flag(parameters, PARAM_BINARY_DATA, f"output '{name}'", binary_default):
            binary.add(name)
        names.append(name)
    return tuple(names), frozenset(binary)


def _request_header(request: Any) -> tuple[str | None, tuple[str, ...], frozenset[str]]:
    """The request's own fields checked: its id, the outputs it wants and which go binary."""
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
    parameters = _parameters(request, "the inference request")  # other server-specific hints: ignored
    binary_default = _flag(parameters, PARAM_BINARY_DATA_OUTPUT, "the inference request", False)
    outputs, binary = requested_outputs(request.get("outputs"), binary_default)
    return request_id, outputs, binary


def _loads(body: bytes | memoryview) -> Any:
    if not body:
        raise _bad('empty body: send an inference request, {"inputs": [...]}')
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"invalid JSON: {exc}") from None


def parse_request(body: bytes, max_rows: int) -> InferRequest:
    """Parse and check a JSON inference request body; BadRequest names what is wrong."""
    fast = fast_single_row(body)
    if fast is not None:
        return fast
    request = _loads(body)
    request_id, outputs, binary = _request_header(request)
    return checked_columns(body, request.get("inputs"), request_id, outputs, max_rows, binary)


def _single_row_decoder() -> tuple[msgspec.json.Decoder, dict[type, str]]:
    """A decoder for the usual single-row request, straight from its bytes, and the feature
    each input struct stands for: ten inputs (tagged by name) of shape [1], an accepted
    datatype and one value within the schema's bounds; no unknown fields, no strings or
    booleans for numbers. What it accepts, checked_columns accepts as the same row; everything
    else takes the long way, which words any error."""
    inputs = []
    for name in FEATURE_NAMES:
        feat = BY_NAME[name]
        if feat.kind == "category":
            value: Any = Literal[feat.categories]  # type: ignore[valid-type]
        elif feat.kind == "float":  # an int stays an int, as checked_columns keeps it
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
            ("outputs", Any, None),  # checked and worded by requested_outputs
        ],
        forbid_unknown_fields=True,
    )
    return msgspec.json.Decoder(request), {cls: name for cls, name in zip(inputs, FEATURE_NAMES, strict=True)}


_SINGLE_ROW, _SINGLE_ROW_NAMES = _single_row_decoder()  # the decoder; each input struct -> its feature
SINGLE_ROW_BODY_BYTES = 4096  # a single-row request is ~700 bytes: bigger bodies skip the short way


def fast_single_row(body: bytes) -> InferRequest | None:
    """The usual single-row request from its bytes, decoded and checked against the schema's
    bounds and categories by msgspec in one call (~2.5x cheaper than orjson + Python checks);
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
    binary_default = request.parameters.get(PARAM_BINARY_DATA_OUTPUT, False) if request.parameters else False
    if type(binary_default) is not bool:
        return None
    outputs, binary = requested_outputs(request.outputs, binary_default)
    return InferRequest(request.id, outputs, row=tuple(values[n] for n in FEATURE_NAMES), binary=binary)


class _Inputs:
    """The inputs of a request seen so far, and the rows they all must have."""

    __slots__ = ("first", "max_rows", "rows", "seen")

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.seen: set[str] = set()
        self.rows: int | None = None
        self.first: str | None = None

    def name(self, i: int, name: Any) -> str:
        """inputs[i]'s name: a feature, given once."""
        if type(name) is not str or name not in BY_NAME:
            raise _bad(f"inputs[{i}]: unknown input {_quote(name)} (inputs: {', '.join(FEATURE_NAMES)})")
        if name in self.seen:
            raise _bad(f"input '{name}' is given twice")
        self.seen.add(name)
        return name

    def rows_of(self, name: str, datatype: Any, shape: Any) -> int:
        """The rows an input holds, by its datatype and shape, checked against the row limit
        and the other inputs (before any of its data is read)."""
        if datatype not in ACCEPTED_DATATYPES[name]:
            allowed = " or ".join(ACCEPTED_DATATYPES[name])
            raise _bad(f"input '{name}': datatype {_quote(datatype)} is not accepted (allowed: {allowed})")
        n = shape[0] if type(shape) is list and len(shape) == 1 and type(shape[0]) is int else _rows(shape)
        if n is None or n < 0:
            raise _bad(f"input '{name}': shape {str(shape)[:50]} is not a column's; send [N] (or [N, 1]) for N rows")
        if self.rows is None:
            self.rows, self.first = n, name
            if n == 0:
                raise _bad(f"input '{name}': shape {shape}: send at least 1 row")
            if n > self.max_rows:
                raise _bad(f"input '{name}': shape {shape}: at most {self.max_rows} rows per request")
        elif n != self.rows:
            raise _bad(
                f"input '{name}' has {n} rows but input '{self.first}' has {self.rows}: "
                "every input is one column of the same rows"
            )
        return n

    def check_complete(self) -> None:
        missing = [n for n in FEATURE_NAMES if n not in self.seen]
        if missing:
            raise _bad(f"missing input(s): {', '.join(missing)} (every feature is one input)")


def _input_fields(name: str, item: dict) -> dict:
    """A JSON input's fields checked (no unknown ones); its parameters."""
    if not INPUT_FIELDS.issuperset(item):
        unknown = sorted(item.keys() - INPUT_FIELDS)[0]
        raise _bad(
            f"input '{name}': unknown field {_quote(unknown)} (allowed: name, shape, datatype, parameters, data)"
        )
    parameters = _parameters(item, f"input '{name}'") if "parameters" in item else {}
    if PARAM_SHARED_MEMORY_REGION in parameters:
        raise _bad(SHARED_MEMORY_UNSUPPORTED)
    return parameters


def _json_data(name: str, item: dict, shape: list, n: int) -> list:
    data = item.get("data")
    if type(data) is not list:
        raise _bad(f"input '{name}': 'data' must be a JSON array of the column's {n} values")
    if len(data) != n:
        raise _bad(f"input '{name}': shape {shape} needs {n} values, data has {len(data)}")
    return data


def checked_columns(
    body: bytes,
    inputs: Any,
    request_id: str | None,
    outputs: tuple[str, ...],
    max_rows: int,
    binary: frozenset[str] = frozenset(),
) -> InferRequest:
    """Any JSON inference request's inputs, as columns checked by the schema; or BadRequest."""
    if not isinstance(inputs, list) or not inputs:
        raise _bad(f"'inputs' must be a JSON array with one input per feature ({', '.join(FEATURE_NAMES)})")
    given: dict[str, tuple[str, list, list]] = {}  # name -> (datatype, shape, data)
    seen = _Inputs(max_rows)
    for i, item in enumerate(inputs):
        if type(item) is not dict:
            raise _bad(f"inputs[{i}] must be a JSON object with name, shape, datatype and data")
        name = seen.name(i, item.get("name"))
        if PARAM_BINARY_DATA_SIZE in _input_fields(name, item):
            raise _bad(
                f"input '{name}': '{PARAM_BINARY_DATA_SIZE}' needs the binary tensor data extension's "
                f"{HEADER_INFERENCE_CONTENT_LENGTH} header (the length of the JSON part of the body)"
            )
        datatype, shape = item.get("datatype"), item.get("shape")
        n = seen.rows_of(name, datatype, shape)
        given[name] = (datatype, shape, _json_data(name, item, shape, n))
    seen.check_complete()
    rows = seen.rows
    assert rows is not None

    # JSON booleans can only be these bytes; NumPy would read them as 1 and 0 next to numbers.
    may_have_bools = b"true" in body or b"false" in body
    columns: dict[str, list | np.ndarray] = _numeric_columns(given, rows, may_have_bools)
    for name in CATEGORICAL_FEATURES:
        _, shape, data = given[name]
        # a few flat values go as they are (the schema checks each); else an object array
        columns[name] = data if rows <= FEW_ROWS and len(shape) == 1 else _strings(name, data, shape, rows)
    return _checked(columns, rows, request_id, outputs, binary)


def _checked(
    columns: dict[str, list | np.ndarray],
    rows: int,
    request_id: str | None,
    outputs: tuple[str, ...],
    binary: frozenset[str],
) -> InferRequest:
    """The columns checked by the schema: one row for the micro-batcher, or checked columns."""
    if rows == 1:
        row = _valid_row(columns)
        if row is not None:
            return InferRequest(request_id, outputs, row=row, binary=binary)
    checked = validate_columns(columns)
    if checked.errors:
        raise _bad(describe_value_errors(checked.errors))
    return InferRequest(request_id, outputs, numeric=checked.numeric, categorical=checked.categorical, binary=binary)


# ------------------------------------------------------------------ tensors: binary and typed data


@dataclass(slots=True)
class Tensor:
    """One input as it arrived, its data in one of three forms: `data`, a JSON input's values;
    `raw`, little-endian bytes (REST binary data, gRPC raw_input_contents); `values`, typed
    values (gRPC `contents`). `item` is the JSON input (REST) for its data and messages."""

    name: Any
    datatype: Any
    shape: Any
    raw: bytes | memoryview | None = None
    values: Sequence[Any] | None = None
    item: dict | None = None


def columns_from_tensors(
    tensors: Sequence[Tensor],
    request_id: str | None,
    outputs: tuple[str, ...],
    binary: frozenset[str],
    max_rows: int,
) -> InferRequest:
    """A request's inputs in any form (binary REST, gRPC; JSON values mixed in), as checked
    columns; or BadRequest. Every input's name, datatype and shape is checked first, then each
    input's data against its shape: raw data by its byte length, before it is decoded."""
    if not tensors:
        raise _bad(f"'inputs' must hold one input per feature ({', '.join(FEATURE_NAMES)})")
    seen = _Inputs(max_rows)
    sized: list[tuple[str, int, Tensor]] = []
    for i, tensor in enumerate(tensors):
        name = seen.name(i, tensor.name)
        sized.append((name, seen.rows_of(name, tensor.datatype, tensor.shape), tensor))
    seen.check_complete()
    rows = seen.rows
    assert rows is not None
    columns: dict[str, list | np.ndarray] = {}
    for name, n, tensor in sized:
        if tensor.raw is not None:
            column = _raw_column(name, tensor.datatype, tensor.shape, n, tensor.raw)
        elif tensor.values is not None:
            column = _typed_column(name, tensor.datatype, tensor.shape, n, tensor.values)
        else:
            data = _json_data(name, tensor.item or {}, tensor.shape, n)
            if tensor.datatype == BYTES:
                column = data if len(tensor.shape) == 1 else _strings(name, data, tensor.shape, n)
            else:
                column = _numbers(name, tensor.datatype, data, tensor.shape, n, may_have_bools=True)
        # a few rows go as Python lists: cheaper to check, and a single row joins the batcher
        columns[name] = column.tolist() if rows <= FEW_ROWS and isinstance(column, np.ndarray) else column
    return _checked(columns, rows, request_id, outputs, binary)


def _raw_column(name: str, datatype: str, shape: list, n: int, raw: bytes | memoryview) -> list | np.ndarray:
    if datatype == BYTES:
        return _raw_strings(name, shape, n, raw)
    itemsize = RAW_DTYPES[datatype].itemsize
    if len(raw) != n * itemsize:
        raise _bad(
            f"input '{name}': {len(raw)} bytes of {datatype} data, but shape {shape} needs {n * itemsize} "
            f"({n} x {itemsize} bytes)"
        )
    array = np.frombuffer(raw, dtype=RAW_DTYPES[datatype])
    if n <= FEW_ROWS:  # plain values, as JSON's: an INT64 stays an int
        return array.tolist()
    return array.astype(np.float64)  # a copy: the request's buffer is not kept


_LENGTH = struct.Struct("<I")


def _raw_strings(name: str, shape: list, n: int, raw: bytes | memoryview) -> np.ndarray:
    """BYTES elements from their raw form: each a 4-byte little-endian length, then its bytes.
    Each length is checked against the bytes left before the element is read; more or fewer
    elements than the shape says, or an element that is not UTF-8, is refused."""
    size, pos = len(raw), 0
    out = np.empty(n, dtype=object)
    for row in range(n):
        if size - pos < _LENGTH.size:
            raise _bad(
                f"input '{name}': BYTES data ends after {row} elements, shape {shape} needs {n} "
                "(each element: a 4-byte little-endian length, then its bytes)"
            )
        (length,) = _LENGTH.unpack_from(raw, pos)
        pos += _LENGTH.size
        if length > size - pos:
            raise _bad(
                f"input '{name}', row {row}: a BYTES element of {length} bytes runs past the end of the "
                f"input's data ({size - pos} bytes left)"
            )
        try:
            out[row] = str(raw[pos : pos + length], "utf-8")
        except UnicodeDecodeError:
            raise _bad(f"input '{name}', row {row}: BYTES data must be UTF-8 text") from None
        pos += length
    if pos != size:
        raise _bad(f"input '{name}': {size - pos} bytes of BYTES data after the {n} elements of shape {shape}")
    return out


def _typed_column(name: str, datatype: str, shape: list, n: int, values: Sequence[Any]) -> list | np.ndarray:
    """A column from typed values (gRPC contents: int64s, doubles or bytes, by datatype)."""
    if len(values) != n:
        raise _bad(f"input '{name}': shape {shape} needs {n} values, contents has {len(values)}")
    if datatype != BYTES:
        return list(values) if n <= FEW_ROWS else np.array(values, dtype=np.float64)
    out = np.empty(n, dtype=object)
    for row, value in enumerate(values):
        try:
            out[row] = str(value, "utf-8")
        except UnicodeDecodeError:
            raise _bad(f"input '{name}', row {row}: BYTES data must be UTF-8 text") from None
    return out


def parse_binary_request(body: bytes, header_length: str, max_rows: int) -> InferRequest:
    """A request in the binary tensor data extension's framing: a JSON header of
    `header_length` bytes, then the binary inputs back to back, each `binary_data_size` bytes,
    in the order of the inputs that have one (the others carry JSON `data`). Every length is
    checked against the body and the others before any input's bytes are read."""
    text = header_length.strip()
    if not text.isdigit() or len(text) > 12:
        raise _bad(f"{HEADER_INFERENCE_CONTENT_LENGTH} must be a byte count, found {_quote(header_length, 20)}")
    json_length = int(text)
    if json_length > len(body):
        raise _bad(f"{HEADER_INFERENCE_CONTENT_LENGTH} {json_length} is longer than the body ({len(body)} bytes)")
    view = memoryview(body)
    request = _loads(view[:json_length])
    request_id, outputs, binary = _request_header(request)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad(f"'inputs' must be a JSON array with one input per feature ({', '.join(FEATURE_NAMES)})")
    tensors = []
    offset = json_length
    for i, item in enumerate(inputs):
        if type(item) is not dict:
            raise _bad(f"inputs[{i}] must be a JSON object with name, shape, datatype and data")
        name = item.get("name")
        if type(name) is not str or name not in BY_NAME:
            raise _bad(f"inputs[{i}]: unknown input {_quote(name)} (inputs: {', '.join(FEATURE_NAMES)})")
        where = f"input '{name}'"
        parameters = _input_fields(name, item)
        tensor = Tensor(name, item.get("datatype"), item.get("shape"), item=item)
        if PARAM_BINARY_DATA_SIZE in parameters:
            size = parameters[PARAM_BINARY_DATA_SIZE]
            if type(size) is not int or size < 0:
                raise _bad(f"{where}: '{PARAM_BINARY_DATA_SIZE}' must be a byte count (an integer >= 0)")
            if "data" in item:
                raise _bad(f"{where}: both 'data' and '{PARAM_BINARY_DATA_SIZE}'; send one of them")
            if size > len(body) - offset:
                raise _bad(
                    f"{where}: '{PARAM_BINARY_DATA_SIZE}' {size} runs past the end of the body "
                    f"({len(body) - offset} bytes left after the JSON header and the binary inputs before it)"
                )
            tensor.raw = view[offset : offset + size]
            offset += size
        tensors.append(tensor)
    if offset != len(body):
        raise _bad(
            f"{len(body) - offset} bytes after the last binary input: the body must be the JSON header "
            f"({HEADER_INFERENCE_CONTENT_LENGTH}) followed by exactly the inputs' binary_data_size bytes"
        )
    return columns_from_tensors(tensors, request_id, outputs, binary, max_rows)


_INTEGER_FEATURES = frozenset(n for n in NUMERIC_FEATURES if BY_NAME[n].kind in ("int", "flag"))


def valid_row(values: dict[str, Any]) -> tuple | None:
    """One row's values by feature (all ten), as the row tuple when /predict's Customer model
    accepts them; None otherwise. An integral FP64 value of an integer feature is that integer
    (as the columns way makes it)."""
    row = []
    for name in FEATURE_NAMES:
        v = values[name]
        if type(v) is float and name in _INTEGER_FEATURES and v.is_integer():
            v = int(v)
        row.append(v)
    try:
        Customer.model_validate(dict(zip(FEATURE_NAMES, row, strict=True)))
    except pydantic.ValidationError:
        return None
    return tuple(row)


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


# ------------------------------------------------------------------ outputs


def output_data(name: str, proba: np.ndarray | list[float], decide: Callable[[Any], Any]) -> np.ndarray | list:
    """An output's values: the probabilities, or the decisions (the engine's `decide`; a single
    row's answer from the micro-batcher is a list, kept as one: no NumPy for one value)."""
    if name == OUTPUT_PROBABILITY:
        return proba
    return [decide(p) for p in proba] if type(proba) is list else decide(proba)


def raw_output(name: str, data: np.ndarray | list) -> bytes:
    """An output's values in the raw form: little-endian float64s, or one byte per boolean."""
    return np.asarray(data, dtype=RAW_DTYPES[OUTPUTS[name]]).tobytes()


def encode_response(
    request: InferRequest, proba: np.ndarray | list[float], decide: Callable[[Any], Any], head: dict[str, Any]
) -> tuple[bytes, int | None]:
    """The REST answer: a JSON body (and None); or, when some outputs go binary, the JSON
    header followed by those outputs' bytes, and the header's length (for the
    Inference-Header-Content-Length response header). `head` holds model name, version and
    the response parameters."""
    shape = [len(proba)]
    outputs = []
    blobs = []
    for name in request.outputs:
        data = output_data(name, proba, decide)
        if name in request.binary:
            blob = raw_output(name, data)
            blobs.append(blob)
            outputs.append(
                {
                    "name": name,
                    "datatype": OUTPUTS[name],
                    "shape": shape,
                    "parameters": {PARAM_BINARY_DATA_SIZE: len(blob)},
                }
            )
        else:
            outputs.append({"name": name, "datatype": OUTPUTS[name], "shape": shape, "data": data})
    body: dict[str, Any] = {"model_name": head["model_name"], "model_version": head["model_version"]}
    if request.id is not None:
        body["id"] = request.id
    body["parameters"] = head["parameters"]
    body["outputs"] = outputs
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join((header, *blobs)), len(header)


def columnar_request(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An inference request for customers (dataset rows as JSON): one [N] input per feature."""
    return {
        "inputs": [
            {"name": n, "shape": [len(rows)], "datatype": INPUT_DATATYPES[n], "data": [r[n] for r in rows]}
            for n in FEATURE_NAMES
        ]
    }


def server_metadata(server_version: str) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version, "extensions": list(EXTENSIONS)}


def model_metadata(version: str, backend: str) -> dict[str, Any]:
    """The model's inputs and outputs, datatypes and shapes ([-1]: any number of rows)."""
    return {
        "name": MODEL_NAME,
        "versions": [version],
        "platform": "onnxruntime_onnx" if backend == "onnxruntime" else "sklearn",
        "inputs": [{"name": n, "datatype": INPUT_DATATYPES[n], "shape": [-1]} for n in FEATURE_NAMES],
        "outputs": [{"name": n, "datatype": d, "shape": [-1]} for n, d in OUTPUTS.items()],
    }
