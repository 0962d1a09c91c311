"""The Open Inference Protocol over gRPC: inference.GRPCInferenceService and grpc.health.v1.

A grpc.aio server on BANKCHURN_GRPC_PORT (default 3001; 0 turns it off), started in the BentoML
worker on its event loop and sharing its engine: a single row joins /predict's micro-batches,
columns go to the inference pool, exactly as over REST. Messages are decoded and checked by
serving.v2.codec, so the answers and their wording are REST's; the status codes:

    INVALID_ARGUMENT    what REST answers with 400 (the message is the same)
    NOT_FOUND           another model or version
    UNAVAILABLE         overloaded ("overloaded: ...; retry later") or shutting down
    RESOURCE_EXHAUSTED  a message over BANKCHURN_MAX_BODY_BYTES, or too many concurrent calls
    DEADLINE_EXCEEDED   not answered within BANKCHURN_REQUEST_TIMEOUT_S (or the client's deadline)
    UNAUTHENTICATED / PERMISSION_DENIED   with API keys on: no or an unknown key / no `predict` scope
    UNIMPLEMENTED       the methods of Triton's own extensions (model configuration, statistics, ...)

With BANKCHURN_API_KEYS_FILE set, a call presents its key as `authorization: Bearer <key>` (or
`x-api-key: <key>`) metadata; ServerLive, ServerReady and grpc.health.v1 stay open, like the
REST probes. Kubernetes' gRPC probes call grpc.health.v1.Health/Check: SERVING while the service
is ready, NOT_SERVING once shutdown starts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from models.schema import FEATURE_NAMES
from models.store import MODEL_NAME
from serving import requestid, telemetry
from serving.auth import PREDICT, AuthError, KeyRing, credential
from serving.concurrency import Overloaded
from serving.engine import V2_GRPC, Engine
from serving.v2 import grpc_predict_v2_pb2 as pb
from serving.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.v2.codec import (
    ACCEPTED_DATATYPES,
    BYTES,
    FP64,
    INT64,
    OUTPUTS,
    PARAM_CLASSIFICATION,
    PARAM_MODEL_VERSION,
    PARAM_SHARED_MEMORY_REGION,
    PARAM_THRESHOLD,
    SHARED_MEMORY_UNSUPPORTED,
    BadRequest,
    InferRequest,
    Tensor,
    columns_from_tensors,
    model_metadata,
    output_data,
    raw_output,
    requested_outputs,
    server_metadata,
    valid_row,
)

logger = logging.getLogger("bentoml.service.bank_churn.grpc")

SERVICE = "inference.GRPCInferenceService"
# The typed contents field of each accepted datatype.
CONTENTS_FIELD = {INT64: "int64_contents", FP64: "fp64_contents", BYTES: "bytes_contents"}
# Messages up to this size are decoded on the event loop, bigger ones on the engine's pool (as
# REST's bodies: a thread hop costs more than a small message).
INLINE_MESSAGE_BYTES = 16 * 1024


class Refused(Exception):
    """An answer other than OK: a status code and the message the client reads."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _quote(value: Any, limit: int = 50) -> str:
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _parameters(parameters: Any) -> dict[str, Any]:
    """A parameters map as plain values (an unset oneof is None)."""
    out = {}
    for key, value in parameters.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, which) if which else None
    return out


def rpc(open_: bool = False) -> Callable:
    """A servicer method with what every call gets: the API key checked (unless open_), the
    request timeout, a Refused or an error turned into its status, and the metrics."""

    def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        label = f"/{SERVICE}/{method.__name__}"

        @functools.wraps(method)
        async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            telemetry.REQUEST_START.set(start)
            code = grpc.StatusCode.OK
            try:
                if not open_ and self.keyring is not None:
                    self.authorize(context)
                remaining = context.time_remaining()
                timeout_s = self.timeout_s if remaining is None else min(self.timeout_s, remaining)
                async with asyncio.timeout(timeout_s):
                    return await method(self, request, context)
            except Refused as exc:
                code = exc.code
                await context.abort(exc.code, exc.message)
            except TimeoutError:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                await context.abort(code, f"Not able to process the request in {timeout_s:g} seconds")
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                logger.exception("%s failed", label)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, "internal error; see the server log")
            finally:
                telemetry.record_grpc(label, code.name, time.perf_counter() - start)

        return handler

    return wrap


def _metadata(context: Any, key: str) -> str | None:
    """A call's metadata value for `key` (the first, as the HTTP edge takes the first header)."""
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value
    return None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the engine; `ready` is the service's readiness."""

    def __init__(
        self,
        engine: Engine,
        ready: Callable[[], bool],
        max_rows: int,
        timeout_s: float,
        server_version: str,
        keyring: KeyRing | None = None,
    ):
        self.engine = engine
        self.ready = ready
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        self.keyring = keyring
        self.version = engine.predictor.bundle.version
        self.server_metadata = pb.ServerMetadataResponse(**server_metadata(server_version))
        metadata = model_metadata(self.version, engine.predictor.backend)
        self.model_metadata = pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["outputs"]],
        )
        self.parameters = {
            PARAM_MODEL_VERSION: pb.InferParameter(string_param=engine.tag),
            PARAM_THRESHOLD: pb.InferParameter(double_param=engine.threshold),
        }

    def authorize(self, context: grpc.aio.ServicerContext) -> None:
        authorization = api_key = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value
            elif key == "x-api-key":
                api_key = value
        assert self.keyring is not None
        try:
            self.keyring.check(credential(authorization, api_key), PREDICT)
        except AuthError as exc:
            code = grpc.StatusCode.UNAUTHENTICATED if exc.status == 401 else grpc.StatusCode.PERMISSION_DENIED
            raise Refused(code, exc.message) from None

    def check_model(self, name: str, version: str) -> None:
        """NOT_FOUND unless the call names this model and, if any, the served version."""
        if name != MODEL_NAME:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"unknown model {_quote(name)}: this server serves '{MODEL_NAME}'")
        if version and version != self.version:
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"model '{MODEL_NAME}' has no version {_quote(version)}: the served version is '{self.version}'",
            )

    # ------------------------------------------------------------ health and metadata

    @rpc(open_=True)
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc(open_=True)
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.ready()))

    @rpc()
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        self.check_model(request.name, request.version)
        return pb.ModelReadyResponse(ready=bool(self.ready()))

    @rpc()
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return self.server_metadata

    @rpc()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        self.check_model(request.name, request.version)
        return self.model_metadata

    # ------------------------------------------------------------ inference

    @rpc()
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        # The call's id, as X-Request-Id is for HTTP: the prediction log files its rows under it.
        # Sent as trailing metadata, which goes out with the status (an error carries it too)
        # and costs no extra message on the stream, as initial metadata would.
        request_id = requestid.adopt(_metadata(context, requestid.GRPC_KEY))
        context.set_trailing_metadata(((requestid.GRPC_KEY, request_id),))
        self.check_model(request.model_name, request.model_version)
        if not self.ready():
            raise Refused(
                grpc.StatusCode.UNAVAILABLE, "not ready: the service is shutting down; retry on another replica"
            )
        try:
            if request.ByteSize() <= INLINE_MESSAGE_BYTES:
                parsed = self.decode(request)
            else:  # decoding a big message would hold up every other call on the loop
                parsed = await self.engine.pool.run(self.decode, request)
            telemetry.record_since_request_start("validate")
            if parsed.row is not None:  # joins concurrent /predict calls in one model call
                proba: Any = [await self.engine.predict_one(parsed.row, route=V2_GRPC)]
            else:
                proba = await self.engine.predict_columns(parsed.numeric, parsed.categorical, route=V2_GRPC)
        except BadRequest as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, exc.message) from None
        except Overloaded as exc:
            telemetry.SHED.inc()
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"overloaded: {exc}; retry later") from None
        return self.encode(parsed, proba)

    def decode(self, request: pb.ModelInferRequest) -> InferRequest:
        """A ModelInferRequest as a checked row or columns: the usual single row the short way
        (fast_row) when it can be, anything else by decode_columns."""
        row = fast_row(request)
        if row is None:
            return decode_columns(request, self.max_rows)
        outputs = tuple(OUTPUTS)
        if request.outputs:
            outputs, _ = requested_outputs(
                [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs]
            )
        return InferRequest(request.id or None, outputs, row=row)

    def encode(self, parsed: InferRequest, proba: Any) -> pb.ModelInferResponse:
        """The outputs as raw_output_contents (what Triton answers; every client reads it)."""
        response = pb.ModelInferResponse(
            model_name=MODEL_NAME, model_version=self.version, id=parsed.id or "", parameters=self.parameters
        )
        rows = len(proba)
        for name in parsed.outputs:
            response.outputs.add(name=name, datatype=OUTPUTS[name], shape=(rows,))
            response.raw_output_contents.append(raw_output(name, output_data(name, proba, self.engine.decide)))
        return response


def decode_columns(request: pb.ModelInferRequest, max_rows: int) -> InferRequest:
    """A ModelInferRequest's inputs as checked columns (codec.columns_from_tensors): raw
    contents by their byte length, typed contents by their count, against the shapes."""
    parameters = _parameters(request.parameters)
    if PARAM_SHARED_MEMORY_REGION in parameters:
        raise BadRequest(SHARED_MEMORY_UNSUPPORTED)
    outputs, _ = requested_outputs([{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs])
    raw = request.raw_input_contents
    inputs = request.inputs
    if raw and len(raw) != len(inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs: one per input, in their order"
        )
    tensors = []
    for i, tensor in enumerate(inputs):
        where = f"input {_quote(tensor.name)}" if tensor.parameters or raw or tensor.HasField("contents") else ""
        if tensor.parameters:
            input_parameters = _parameters(tensor.parameters)
            if PARAM_SHARED_MEMORY_REGION in input_parameters:
                raise BadRequest(SHARED_MEMORY_UNSUPPORTED)
            if PARAM_CLASSIFICATION in input_parameters:
                raise BadRequest(f"{where}: unknown parameter '{PARAM_CLASSIFICATION}'")
        shape = list(tensor.shape)
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise BadRequest(f"{where}: both contents and raw_input_contents; send one of them")
            tensors.append(Tensor(tensor.name, tensor.datatype, shape, raw=raw[i]))
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if has_contents:
            given = [f.name for f, _ in tensor.contents.ListFields()]
            if field is not None and any(g != field for g in given):
                raise BadRequest(f"{where}: {tensor.datatype} data goes in contents.{field}, found {', '.join(given)}")
        values = getattr(tensor.contents, field) if field is not None else ()
        tensors.append(Tensor(tensor.name, tensor.datatype, shape, values=values))
    return columns_from_tensors(tensors, request.id or None, outputs, frozenset(), max_rows)


_NUMBER = {INT64: struct.Struct("<q"), FP64: struct.Struct("<d")}
_LENGTH = struct.Struct("<I")
_ACCEPTED = {name: frozenset(datatypes) for name, datatypes in ACCEPTED_DATATYPES.items()}


def fast_row(request: pb.ModelInferRequest) -> tuple | None:
    """The usual single-row request (ten inputs of shape [1], an accepted datatype, no
    parameters; raw or typed contents) as a row the schema accepts, without building columns;
    None for anything else, which decode() takes the long way (and words any error).
    tests/test_v2_grpc.py holds it to the long way's rows."""
    inputs, raw = request.inputs, request.raw_input_contents
    if len(inputs) != len(FEATURE_NAMES) or request.parameters or (raw and len(raw) != len(inputs)):
        return None
    values: dict[str, Any] = {}
    for i, tensor in enumerate(inputs):
        name, datatype = tensor.name, tensor.datatype
        if datatype not in _ACCEPTED.get(name, ()) or len(tensor.shape) != 1 or tensor.shape[0] != 1:
            return None
        if tensor.parameters:
            return None
        if raw:
            if tensor.HasField("contents"):
                return None
            data = raw[i]
            if datatype == BYTES:
                if len(data) < 4 or _LENGTH.unpack_from(data)[0] != len(data) - 4:
                    return None
                try:
                    value: Any = str(data[4:], "utf-8")
                except UnicodeDecodeError:
                    return None
            else:
                if len(data) != 8:
                    return None
                (value,) = _NUMBER[datatype].unpack(data)
        else:
            given = tensor.contents.ListFields()
            if len(given) != 1 or given[0][0].name != CONTENTS_FIELD[datatype] or len(given[0][1]) != 1:
                return None
            value = given[0][1][0]
            if datatype == BYTES:
                try:
                    value = str(value, "utf-8")
                except UnicodeDecodeError:
                    return None
        values[name] = value
    if len(values) != len(FEATURE_NAMES):  # a name given twice
        return None
    return valid_row(values)


class GrpcServer:
    """The gRPC server of one worker: the inference service and grpc.health.v1."""

    def __init__(self, servicer: InferenceServicer, host: str, port: int, max_message_bytes: int, max_rpcs: int):
        self.servicer = servicer
        self.address = f"{host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.max_rpcs = max_rpcs
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = port

    async def start(self) -> None:
        # Messages over the body limit are refused by gRPC itself (RESOURCE_EXHAUSTED) before
        # they are decoded; calls beyond max_rpcs at once too, instead of queueing without bound.
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.max_rpcs)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(self.address)  # raises when the port is taken
        await server.start()
        self.server = server
        for service in ("", SERVICE):  # "" is the server as a whole (what probes ask by default)
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("gRPC (%s, grpc.health.v1) listening on %s", SERVICE, self.address)

    async def stop(self, grace_s: float) -> None:
        """Health turns NOT_SERVING, new calls are refused, calls in flight get grace_s to finish."""
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace_s)
