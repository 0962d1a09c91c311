"""The /jobs HTTP edge (a hot route, see serving.edge): submit a CSV, poll, fetch, cancel, erase.

    POST   /jobs                  multipart file=@customers.csv (or a text/csv body) -> 202 {"job_id", "status"}
    GET    /jobs/{job_id}         -> the job's status and progress; 404 for an unknown id
    GET    /jobs/{job_id}/result  -> {"predictions": [...], "errors": [...], ...}; ?format=csv for CSV;
                                     409 while the job is not completed
    DELETE /jobs/{job_id}         -> a queued or running job: cancelled (what it scored so far is erased);
                                     a finished one: erased with its results (404 afterwards)

Every answer but the streamed result is a small JSON body; errors are {"error": "..."}.

With API keys (serving.auth), a job belongs to the key that created it: another key's job is
answered exactly as an unknown id (404), so its existence is not revealed; a key with the
`admin` scope may use any job. Without keys, the job id itself is the secret. Either way the
id never reaches a log: log lines and the access log name a job by its ref (store.job_ref).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from serving.auth import PRINCIPAL_KEY
from serving.concurrency import Overloaded
from serving.edge import HttpError, overloaded, send_json
from serving.jobs.csvfile import CsvRejected
from serving.jobs.manager import JobManager, may_use, public
from serving.jobs.store import ID_LENGTH, STATUSES, StoreUnavailable, is_job_id, job_key, job_ref
from serving.jobs.upload import FILE_FIELD, UploadSlots, check_headers, receive_upload

PREFIX = "/jobs"
RETRY_LATER = {"Retry-After": "5"}


def _unavailable(exc: StoreUnavailable) -> HttpError:
    return HttpError(503, f"scoring jobs are unavailable right now: {exc}; retry later", headers=RETRY_LATER)


def log_path(path: str) -> str:
    """The path as logs and traces may show it: the job id replaced by its ref."""
    parts = path[len(PREFIX) :].split("/")
    if len(parts) >= 2 and parts[1]:
        parts[1] = "ref:" + job_ref(job_key(parts[1]))
    return PREFIX + "/".join(parts)


class JobRoutes:
    """ASGI app for everything under /jobs."""

    # Uploads of up to BANKCHURN_MAX_UPLOAD_BYTES and streamed results take longer than an
    # online request's timeout; this bounds them instead.
    timeout_s = 300.0
    log_path = staticmethod(log_path)

    def __init__(self, manager: JobManager, max_upload_bytes: int, max_concurrent_uploads: int = 2):
        self.manager = manager
        self.max_upload_bytes = max_upload_bytes
        self.slots = UploadSlots(max_concurrent_uploads)

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
        principal = scope.get(PRINCIPAL_KEY)
        try:
            if parts == [""]:
                _allow(method, "POST")
                await self._submit(scope, receive, send, principal)
            elif len(parts) == 1:
                _allow(method, "GET", "DELETE")
                job_id = _job_id(parts[0])
                if method == "GET":
                    await self._status(job_id, principal, send)
                else:
                    await self._delete(job_id, principal, send)
            elif len(parts) == 2 and parts[1] == "result":
                _allow(method, "GET")
                await self._result(_job_id(parts[0]), principal, scope, send)
            else:
                raise HttpError(404, f"no such path under {PREFIX}: see /docs.json")
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None
        except Overloaded as exc:
            raise overloaded(exc) from None

    async def _submit(self, scope: Scope, receive: Receive, send: Send, principal: Any) -> None:
        check_headers(scope, self.max_upload_bytes)  # a request that cannot be read is told so, slots or not
        with self.slots.take():
            source, filename = await receive_upload(scope, receive, self.max_upload_bytes)
            try:
                job = await self.manager.submit(source, filename, principal.name if principal is not None else "")
            except CsvRejected as exc:
                raise HttpError(exc.status, str(exc)) from None
            finally:
                source.close()
        await send_json(send, 202, {"job_id": job["job_id"], "status": job["status"], "rows_total": job["rows_total"]})

    async def _status(self, job_id: str, principal: Any, send: Send) -> None:
        await send_json(send, 200, public(await self._record(job_id, principal), job_id))

    async def _delete(self, job_id: str, principal: Any, send: Send) -> None:
        record = await self._record(job_id, principal)
        if record["status"] in ("queued", "running"):
            status, cancelled = await self.manager.cancel(job_id)
            if cancelled:
                await send_json(send, 200, public(await self._record(job_id, principal), job_id))
                return
            if status == "missing":
                raise _not_found(job_id)
        # finished (or it finished meanwhile): erase it and its results
        if not await self.manager.erase(job_id):
            raise _not_found(job_id)
        await send_json(send, 200, {"job_id": job_id, "erased": True, "status": record["status"]})

    async def _result(self, job_id: str, principal: Any, scope: Scope, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        fmt = (query.get("format") or ["json"])[-1].lower()
        if fmt not in ("json", "csv"):
            raise HttpError(400, f"format: {fmt[:20]!r} is not one of 'json', 'csv'")
        record = await self._record(job_id, principal)
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
            parts = self.manager.result_csv(record, job_id)
        else:
            headers = [(b"content-type", b"application/json")]
            parts = self.manager.result_json(record, job_id)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _record(self, job_id: str, principal: Any) -> dict[str, str]:
        record = await self.manager.status(job_id)
        if record is None or not may_use(record, principal):
            raise _not_found(job_id)  # another key's job: exactly as an unknown one
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
        "ref": {"type": "string", "description": "how the server's logs name this job (not its id)"},
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
                "503": _answer(
                    "the job store is unreachable, full or read-only, or BANKCHURN_MAX_CONCURRENT_UPLOADS "
                    "uploads are being received already; retry after Retry-After seconds"
                ),
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
            "summary": "Cancel a queued or running job, or erase a finished one with its results",
            "description": "A queued or running job is cancelled: its remaining rows are not scored and "
            "what it scored so far is erased; its status stays readable (cancelled) until it expires. "
            "A finished job (completed, failed, cancelled) is erased at once with its results: "
            "it is 404 afterwards.",
            "parameters": [_JOB_ID],
            "responses": {
                "200": _answer("cancelled (the job's status) or erased ({job_id, erased: true, status})", _STATUS),
                "404": _answer("unknown job"),
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
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/csv": {
                            "schema": {
                                "type": "string",
                                "description": "row,CustomerId,churn_probability,will_churn,error; a cell that "
                                "starts with = + - @ tab or CR is prefixed with ' (spreadsheet formula injection)",
                            }
                        },
                    },
                },
                "404": _answer("unknown job"),
                "409": _answer("not completed (yet)"),
            },
        }
    },
}
