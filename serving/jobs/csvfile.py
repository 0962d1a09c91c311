"""CSV scoring, the sync core of a job: check an upload, cut it into chunks, score a chunk.

Rows are numbered like the file's data rows, from 1 (blank lines are skipped, as
`csv.DictReader` skips them). A chunk is rows [k*C + 1, (k+1)*C] for chunk size C, so the
chunks of an upload are the same on every worker and a job can resume at any chunk.
Everything here is plain blocking code: the jobs run it on their own low-priority threads.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pydantic

from models.predictor import Predictor
from models.schema import BY_NAME, FEATURE_NAMES, ID_COLUMN, Customer, row_values
from serving import telemetry
from serving.http import describe_validation_errors

_INT = re.compile(r"^[+-]?\d+$")


class CsvRejected(ValueError):
    """The upload as a whole cannot be scored; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """What a job needs to know about a checked upload."""

    rows: int
    has_customer_id: bool


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CsvRejected(f"the file is not UTF-8 text ({exc}); save it as UTF-8 CSV") from None


def _records(text: str) -> Iterator[list[str]]:
    """The file's records after the header, blank lines skipped."""
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader, None)
    return (record for record in reader if record)


def inspect_upload(data: bytes, max_rows: int) -> Upload:
    """Check an upload before it becomes a job: UTF-8, a header with every feature column,
    1 to max_rows data rows, readable as CSV. Raises CsvRejected naming what is wrong."""
    text = _text(data)
    try:
        header = next(csv.reader(io.StringIO(text, newline="")), [])
        missing = [name for name in FEATURE_NAMES if name not in header]
        if missing:
            shown = ", ".join(h[:40] for h in header[:20]) + (", ..." if len(header) > 20 else "")
            raise CsvRejected(
                f"missing column(s): {', '.join(missing)} (the header has: {shown or 'nothing'}); "
                f"required: {', '.join(FEATURE_NAMES)}"
            )
        rows = sum(1 for _ in _records(text))
    except csv.Error as exc:  # e.g. a field over the csv module's 128 KiB limit
        raise CsvRejected(f"unreadable CSV: {exc}") from None
    if rows == 0:
        raise CsvRejected("the file has a header but no data rows")
    if rows > max_rows:
        raise CsvRejected(
            f"the file has {rows} data rows; a job takes at most {max_rows} (BANKCHURN_MAX_CSV_ROWS): split it",
            status=413,
        )
    return Upload(rows=rows, has_customer_id=ID_COLUMN in header)


class Chunks:
    """Iterates an upload chunk by chunk: (chunk index, first row number, records).

    `skip` holds chunk indices already done (a resumed job); they are read past, not scored.
    Not thread-safe; one job's chunks are read by one thread at a time.
    """

    def __init__(self, data: bytes, chunk_rows: int):
        text = _text(data)
        reader = csv.reader(io.StringIO(text, newline=""))
        self.header = next(reader, [])
        self._records = (record for record in reader if record)
        self.chunk_rows = chunk_rows
        self._next_index = 0

    def next_chunk(self, skip: set[int]) -> tuple[int, int, list[list[str]]] | None:
        """The next chunk not in `skip`, or None at the end of the file."""
        while True:
            index = self._next_index
            records = list(itertools.islice(self._records, self.chunk_rows))
            if not records:
                return None
            self._next_index += 1
            if index not in skip:
                return index, index * self.chunk_rows + 1, records


def _coerce(name: str, text: str) -> Any:
    """CSV cells are text: turn them into the JSON types the schema validates."""
    kind = BY_NAME[name].kind
    text = text.strip()
    if kind == "category" or text == "":
        return text if text != "" else None
    if kind in ("int", "flag"):
        if _INT.match(text):
            try:
                return int(text)
            except ValueError:  # more digits than Python converts; the schema reports it
                return text
        try:
            value = float(text)
        except ValueError:
            return text
        return int(value) if math.isfinite(value) and value.is_integer() else value
    try:
        return float(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class ChunkResult:
    """A scored chunk: its predictions and errors as JSON array *contents* (no brackets), so
    the result of a whole job is streamed by joining chunks, never parsed and re-encoded."""

    predictions: bytes
    errors: bytes
    scored: int
    failed: int


def score_chunk(
    predictor: Predictor, header: list[str], first_row: int, records: list[list[str]], with_id: bool
) -> ChunkResult:
    """Validate each record against the schema, score the valid ones in one model call."""
    position = {name: header.index(name) for name in FEATURE_NAMES}  # the first of a repeated column
    id_at = header.index(ID_COLUMN) if with_id else None
    width = len(header)
    rows, meta, errors = [], [], []
    with telemetry.stage("csv_validate"):
        for offset, record in enumerate(records):
            number = first_row + offset
            entry: dict[str, Any] = {"row": number}
            if id_at is not None:
                entry[ID_COLUMN] = record[id_at] if id_at < len(record) else None
            if len(record) != width:
                errors.append(
                    {**entry, "error": f"wrong number of fields on this line ({len(record)}, header has {width})"}
                )
                continue
            candidate = {name: _coerce(name, record[i]) for name, i in position.items()}
            try:
                customer = Customer.model_validate(candidate)
            except pydantic.ValidationError as exc:
                errors.append({**entry, "error": "; ".join(describe_validation_errors(exc.errors()))})
                continue
            rows.append(row_values(customer))
            meta.append(entry)
    predictions: list[dict[str, Any]] = []
    if rows:
        telemetry.BATCH_ROWS.observe(len(rows))
        with telemetry.stage("predict"):
            proba = predictor.predict_rows(rows)
        threshold = predictor.threshold
        telemetry.record_predictions(proba, threshold)
        predictions = [
            {**entry, "churn_probability": p, "will_churn": p >= threshold}
            for entry, p in zip(meta, proba.tolist(), strict=True)
        ]
    return ChunkResult(
        predictions=orjson.dumps(predictions)[1:-1],
        errors=orjson.dumps(errors)[1:-1],
        scored=len(predictions),
        failed=len(errors),
    )


CSV_COLUMNS = ("row", ID_COLUMN, "churn_probability", "will_churn", "error")


def csv_header(with_id: bool) -> bytes:
    columns = [c for c in CSV_COLUMNS if with_id or c != ID_COLUMN]
    return (",".join(columns) + "\r\n").encode()


def chunk_as_csv(predictions: bytes, errors: bytes, with_id: bool) -> bytes:
    """One chunk of a result as CSV lines, in row order (predictions and errors merged)."""
    lines = orjson.loads(b"[" + predictions + b"]") + orjson.loads(b"[" + errors + b"]")
    lines.sort(key=lambda entry: entry["row"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    for entry in lines:
        row = [entry["row"]]
        if with_id:
            row.append(entry.get(ID_COLUMN) or "")
        if "error" in entry:
            row += ["", "", entry["error"]]
        else:
            row += [repr(entry["churn_probability"]), "true" if entry["will_churn"] else "false", ""]
        writer.writerow(row)
    return out.getvalue().encode()
