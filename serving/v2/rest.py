"""The Open Inference Protocol (KServe V2) REST API under /v2, as a hot route (serving.edge).

    GET  /v2                                   server metadata
    GET  /v2/health/live                       liveness
    GET  /v2/health/ready                      readiness (the service's own: false once shutdown starts)
    GET  /v2/models/bank_churn                 model metadata: the 10 inputs and 2 outputs
    GET  /v2/models/bank_churn/ready           model readiness
    POST /v2/models/bank_churn/infer           inference: JSON, or the binary tensor data extension
    ... and the same three under /v2/models/bank_churn/versions/<served version>

Bodies are decoded and checked by serving.v2.codec (shared with gRPC); small ones on the
event loop (cheaper than a thread hop), bigger ones on the engine's pool, like /predict_batch.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from models.store import MODEL_NAME
from serving import telemetry
from serving.concurrency import Overloaded
from serving.edge import RETRY_AFTER, HttpError, overloaded, read_body, send_json
from serving.engine import V2_INFER, Engine
from serving.v2 import openapi
from serving.v2.codec import (
    HEADER_INFERENCE_CONTENT_LENGTH,
    PARAM_MODEL_VERSION,
    PARAM_THRESHOLD,
    PREFIX,
    BadRequest,
    encode_response,
    model_metadata,
    parse_binary_request,
    parse_request,
    server_metadata,
)

_BINARY_HEADER = HEADER_INFERENCE_CONTENT_LENGTH.lower().encode()
_OCTET_STREAM = "application/octet-stream"
_MEDIA_TYPES = frozenset({"", "application/json", _OCTET_STREAM})
_HEAD = "HEAD"
# Bodies up to this size are parsed and checked on the event loop, bigger ones on the engine's
# pool (a thread hop costs more than a small body). Measured on the shared 2-core machine
# (CPU time): 1 row (670 B) 18 us, 100 rows (5.5 KiB) 0.2 ms, 300 rows (15 KiB) 0.5 ms,
# 1,000 rows (49 KiB) 1.7 ms.
INLINE_BODY_BYTES = 16 * 1024


def _quote(value: Any, limit: int = 50) -> str:
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


async def send_binary(send: Send, payload: bytes, header_length: int) -> None:
    """A binary tensor data answer: the JSON header's length in Inference-Header-Content-Length."""
    headers = [
        (b"content-type", _OCTET_STREAM.encode()),
        (b"content-length", str(len(payload)).encode()),
        (_BINARY_HEADER, str(header_length).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


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
        self.head = {"model_name": MODEL_NAME, "model_version": self.version, "parameters": self.parameters}
        self.server_version = server_version or importlib.metadata.version("bentoml")
        self.server_metadata_body = orjson.dumps(server_metadata(self.server_version))
        self.model_metadata_body = orjson.dumps(model_metadata(self.version, engine.predictor.backend))
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
        json_length = None
        for key, value in scope["headers"]:  # one pass over the headers for both
            if key == b"content-type":
                media = value.decode("latin-1").split(";")[0].strip().lower()
            elif key == _BINARY_HEADER:
                json_length = value.decode("latin-1")
        if media not in _MEDIA_TYPES:
            raise HttpError(
                415,
                f"Content-Type {media[:50]!r} is not supported; send application/json (or application/octet-stream "
                f"with the {HEADER_INFERENCE_CONTENT_LENGTH} header: the binary tensor data extension)",
            )
        if media == _OCTET_STREAM and json_length is None:
            raise HttpError(
                400,
                f"an application/octet-stream body needs the {HEADER_INFERENCE_CONTENT_LENGTH} header: the length "
                "of its JSON header (the binary tensor data extension)",
            )
        if not self.ready():
            raise HttpError(
                503, "not ready: the service is shutting down; retry on another replica", headers=RETRY_AFTER
            )
        body = await read_body(scope, receive, self.max_body_bytes)
        try:
            if json_length is not None:
                parse, args = parse_binary_request, (body, json_length, self.max_rows)
            else:
                parse, args = parse_request, (body, self.max_rows)
            if len(body) <= INLINE_BODY_BYTES:
                request = parse(*args)
            else:  # parsing a big body would hold up every other request on the loop
                request = await self.engine.pool.run(parse, *args)
            telemetry.record_since_request_start("validate")
            if request.row is not None:  # joins concurrent /predict calls in one model call
                proba = [await self.engine.predict_one(request.row, route=V2_INFER)]
            else:
                proba = await self.engine.predict_columns(request.numeric, request.categorical, route=V2_INFER)
        except BadRequest as exc:
            raise HttpError(400, exc.message) from None
        except Overloaded as exc:
            raise overloaded(exc) from None
        payload, header_length = encode_response(request, proba, self.engine.decide, self.head)
        if header_length is None:
            await send_json(send, 200, payload)
        else:
            await send_binary(send, payload, header_length)

    # ------------------------------------------------------------ OpenAPI

    def openapi_paths(self) -> dict[str, Any]:
        return openapi.openapi_paths(self.version, self.max_rows)
