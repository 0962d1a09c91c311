"""The /jobs HTTP edge (a hot route, see serving.edge): submit a CSV, poll, fetch, cancel.

    POST   /jobs                  multipart file=@customers.csv (or a text/csv body) -> 202 {"job_id", "status"}
    GET    /jobs/{job_id}         -> the job's status and progress; 404 for an unknown id
    GET    /jobs/{job_id}/result  -> {"predictions": [...], "errors": [...], ...}; ?format=csv for CSV;
                                     409 while the job is not completed
    DELETE /jobs/{job_id}         -> cancels a queued or running job; 409 if it already finished

Every answer but the streamed result is a small JSON body; errors are {"error": "..."}.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Receive, Scope, Send

from serving.concurrency import Overloaded
from serving.edge import HttpError, media_type, overloaded, read_body, send_json
from serving.jobs.csvfile import CsvRejected
from serving.jobs.manager import JobManager, public
from serving.jobs.store import ID_LENGTH, STATUSES, StoreUnavailable, is_job_id

PREFIX = "/jobs"
FILE_FIELD = "file"
RETRY_LATER = {"Retry-After": "5"}


def _unavailable(exc: StoreUnavailable) -> HttpError:
    return HttpError(503, f"scoring jobs are unavailable right now: {exc}; retry later", headers=RETRY_LATER)


async def _file_from_multipart(headers: Headers, body: bytes) -> tuple[bytes, str]:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=10).parse()
    except MultiPartException as exc:
        raise HttpError(400, f"malformed multipart/form-data body: {exc.message}") from None
    try:
        part = form.get(FILE_FIELD)
        if not isinstance(part, UploadFile):
            names = ", ".join(repr(k[:40]) for k in form) or "none"
            raise HttpError(
                400,
                f"multipart/form-data needs a file part named {FILE_FIELD!r} with a filename "
                f"(curl -F {FILE_FIELD}=@customers.csv); parts sent: {names}",
            )
        return await part.read(), part.filename or "upload.csv"
    finally:
        await form.close()


class JobRoutes:
    """ASGI app for everything under /jobs."""

    # Uploads of up to BANKCHURN_MAX_UPLOAD_BYTES and streamed results take longer than an
    # online request's timeout; this bounds them instead.
    timeout_s = 300.0

    def __init__(self, manager: JobManager, max_upload_bytes: int):
        self.manager = manager
        self.max_upload_bytes = max_upload_bytes

    @staticmethod
    def route_label(scope: Scope) -> str:
        parts = scope["path"][len(PREFIX) :].strip("/").split("/")
        if parts == [""]:
            return PREFIX
        if len(parts) == 1:
            return f"{PREFIX}/{{job_id}}"
        if len(parts) == 2 and parts[1] == "result":
            return f"{PREFIX}/{{job_id}}/result"
        return f"{PREFIX}/*"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = scope["path"][len(PREFIX) :].strip("/").split("/")
        method = scope["method"]
        try:
            if parts == [""]:
                _allow(method, "POST")
                await self._submit(scope, receive, send)
            elif len(parts) == 1:
                _allow(method, "GET", "DELETE")
                job_id = _job_id(parts[0])
                await (self._status if method == "GET" else self._cancel)(job_id, send)
            elif len(parts) == 2 and parts[1] == "result":
                _allow(method, "GET")
                await self._result(_job_id(parts[0]), scope, send)
            else:
                raise HttpError(404, f"no such path under {PREFIX}: see /docs.json")
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None
        except Overloaded as exc:
            raise overloaded(exc) from None

    async def _submit(self, scope: Scope, receive: Receive, send: Send) -> None:
        media = media_type(scope)
        if media not in ("multipart/form-data", "text/csv"):
            raise HttpError(
                415,
                f"Content-Type {media[:50] or 'none'!r} is not supported here: send multipart/form-data with a "
                f"file part named {FILE_FIELD!r} (curl -F {FILE_FIELD}=@customers.csv) or a text/csv body",
            )
        body = await read_body(scope, receive, self.max_upload_bytes)
        if media == "text/csv":
            data, filename = body, "upload.csv"
        else:
            headers = Headers(scope=scope)
            # Parsed on a thread: a multipart body of many MiB would otherwise stall the loop.
            data, filename = await asyncio.to_thread(lambda: asyncio.run(_file_from_multipart(headers, body)))
        try:
            job = await self.manager.submit(data, filename)
        except CsvRejected as exc:
            raise HttpError(exc.status, str(exc)) from None
        await send_json(send, 202, {"job_id": job["job_id"], "status": job["status"], "rows_total": job["rows_total"]})

    async def _status(self, job_id: str, send: Send) -> None:
        await send_json(send, 200, public(await self._record(job_id)))

    async def _cancel(self, job_id: str, send: Send) -> None:
        status, cancelled = await self.manager.cancel(job_id)
        if status == "missing":
            raise _not_found(job_id)
        if not cancelled:
            raise HttpError(409, f"job {job_id} already {status}; nothing to cancel", status=status)
        await send_json(send, 200, public(await self._record(job_id)))

    async def _result(self, job_id: str, scope: Scope, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        fmt = (query.get("format") or ["json"])[-1].lower()
        if fmt not in ("json", "csv"):
            raise HttpError(400, f"format: {fmt[:20]!r} is not one of 'json', 'csv'")
        record = await self._record(job_id)
        if record["status"] != "completed":
            raise HttpError(
                409,
                f"job {job_id} is {record['status']}; its result is available once it has completed",
                status=record["status"],
                rows_done=int(record.get("rows_done", "0")),
                rows_total=int(record.get("rows_total", "0")),
            )
        if fmt == "csv":
            headers = [
                (b"content-type", b"text/csv; charset=utf-8"),
                (b"content-disposition", f'attachment; filename="churn-{job_id}.csv"'.encode()),
            ]
            parts = self.manager.result_csv(record)
        else:
            headers = [(b"content-type", b"application/json")]
            parts = self.manager.result_json(record)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _record(self, job_id: str) -> dict[str, str]:
        record = await self.manager.status(job_id)
        if record is None:
            raise _not_found(job_id)
        return record

    def openapi_paths(self) -> dict[str, Any]:
        return _OPENAPI


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise HttpError(
            405,
            f"method {method} not allowed here; allowed: {', '.join(allowed)}",
            headers={"Allow": ", ".join(allowed)},
        )


def _job_id(text: str) -> str:
    if not is_job_id(text):
        raise _not_found(text)
    return text


def _not_found(job_id: str) -> HttpError:
    shown = job_id if len(job_id) <= ID_LENGTH else job_id[:ID_LENGTH] + "..."
    return HttpError(404, f"no job {shown!r} (unknown, or its result expired)")


_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_STATUS = {
    "type": "object",
    "properties": {
        "job_id": {"type": "string"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "rows_total": {"type": "integer"},
        "rows_done": {"type": "integer", "description": "rows processed so far (scored or reported)"},
        "rows_failed": {"type": "integer", "description": "rows reported as errors so far"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": "string", "format": "date-time"},
        "completed_at": {"type": "string", "format": "date-time"},
        "model_version": {"type": "string"},
        "worker": {"type": "string", "description": "host:pid of the worker running it (last)"},
        "attempts": {"type": "integer", "description": "runs of the job so far (more than 1: resumed)"},
        "error": {"type": "string"},
    },
    "required": ["job_id", "status", "rows_total", "rows_done", "created_at", "updated_at"],
}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or _ERROR}}}


_OPENAPI: dict[str, Any] = {
    PREFIX: {
        "post": {
            "tags": ["Scoring jobs"],
            "summary": "Submit a CSV of customers to score in the background",
            "description": "The file needs the dataset's feature columns (extra columns are ignored; CustomerId "
            "is carried through). It is checked before it is accepted. Bad rows are reported one by one.",
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                            "required": [FILE_FIELD],
                        }
                    },
                    "text/csv": {"schema": {"type": "string"}},
                },
            },
            "responses": {
                "202": _answer(
                    "queued",
                    {
                        "type": "object",
                        "properties": {
                            "job_id": {"type": "string"},
                            "status": {"type": "string"},
                            "rows_total": {"type": "integer"},
                        },
                    },
                ),
                "400": _answer("not a CSV the service can score (names what is wrong)"),
                "413": _answer("the file is larger than BANKCHURN_MAX_UPLOAD_BYTES or has too many rows"),
                "415": _answer("neither multipart/form-data nor text/csv"),
                "503": _answer("the job store is unreachable; retry later"),
            },
        }
    },
    f"{PREFIX}/{{job_id}}": {
        "get": {
            "tags": ["Scoring jobs"],
            "summary": "A job's status and progress",
            "parameters": [_JOB_ID],
            "responses": {"200": _answer("the job", _STATUS), "404": _answer("unknown job (or expired)")},
        },
        "delete": {
            "tags": ["Scoring jobs"],
            "summary": "Cancel a queued or running job (its remaining rows are not scored)",
            "parameters": [_JOB_ID],
            "responses": {
                "200": _answer("cancelled", _STATUS),
                "404": _answer("unknown job"),
                "409": _answer("the job already finished"),
            },
        },
    },
    f"{PREFIX}/{{job_id}}/result": {
        "get": {
            "tags": ["Scoring jobs"],
            "summary": "A completed job's predictions and per-row errors",
            "parameters": [
                _JOB_ID,
                {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}},
            ],
            "responses": {
                "200": {
                    "description": "predictions ({row, CustomerId?, churn_probability, will_churn}) and errors "
                    "({row, CustomerId?, error}); row is the 1-based data row of the uploaded file",
                    "content": {"application/json": {"schema": {"type": "object"}}, "text/csv": {}},
                },
                "404": _answer("unknown job"),
                "409": _answer("not completed (yet)"),
            },
        }
    },
}
