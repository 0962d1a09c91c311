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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from models.columns import validate_columns
from models.schema import BY_NAME, FEATURE_NAMES, ID_COLUMN, Feature
from serving import telemetry
from serving.engine import JOBS, Engine


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


def _parse_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # not a number at all; None marks it for its own message
        return None


def _number_column(cells: tuple[str, ...], feature: Feature) -> tuple[np.ndarray, dict[int, str]]:
    """A numeric CSV column as float64, and the offsets of cells that are no number at all
    (with their message). Range, integer and finiteness rules are validate_columns'."""
    try:
        return np.fromiter(map(float, cells), dtype=np.float64, count=len(cells)), {}
    except ValueError:
        pass
    values = [_parse_number(c) for c in cells]
    noun = "an integer" if feature.kind in ("int", "flag") else "a number"
    bad = {
        i: (
            f"Input should be {noun}, found an empty cell"
            if not cells[i].strip()
            else f"Input should be {noun}, unable to parse {cells[i][:40]!r}"
        )
        + f" (allowed: {feature.allowed()})"
        for i, v in enumerate(values)
        if v is None
    }
    return np.array([0.0 if v is None else v for v in values], dtype=np.float64), bad


@dataclass(frozen=True)
class ChunkResult:
    """A scored chunk: its predictions and errors as JSON array *contents* (no brackets), so
    the result of a whole job is streamed by joining chunks, never parsed and re-encoded."""

    predictions: bytes
    errors: bytes
    scored: int
    failed: int


def score_chunk(
    engine: Engine, header: list[str], first_row: int, records: list[list[str]], with_id: bool, job_id: str
) -> ChunkResult:
    """Validate a chunk's records against the schema (vectorised, columns at a time), score
    the valid ones in one model call (the engine's, on this thread), report each invalid one
    with every problem it has."""
    position = {name: header.index(name) for name in FEATURE_NAMES}  # the first of a repeated column
    id_at = header.index(ID_COLUMN) if with_id else None
    width = len(header)
    rows = np.arange(first_row, first_row + len(records))
    whole = [i for i, record in enumerate(records) if len(record) == width]
    problems: dict[int, list[str]] = {
        i: [f"wrong number of fields on this line ({len(record)}, the header has {width})"]
        for i, record in enumerate(records)
        if len(record) != width
    }
    scored: list[dict[str, Any]] = []
    with telemetry.stage("csv_validate"):
        kept = [records[i] for i in whole]
        by_column = list(zip(*kept, strict=True)) if kept else [()] * width  # transposed in C
        columns: dict[str, Any] = {}
        for name in FEATURE_NAMES:
            feature = BY_NAME[name]
            if feature.kind == "category":
                columns[name] = np.array(list(map(str.strip, by_column[position[name]])), dtype=object)
                continue
            cells = by_column[position[name]]  # float() ignores surrounding whitespace itself
            columns[name], unparsable = _number_column(cells, feature)
            for i, message in unparsable.items():
                problems.setdefault(whole[i], []).append(f"{name}: {message}")
        checked = validate_columns(columns) if kept else None
    if checked is not None:
        for i, name, message in checked.errors:
            if not any(p.startswith(f"{name}: ") for p in problems.get(whole[i], ())):  # one error a cell
                problems.setdefault(whole[i], []).append(f"{name}: {message}")
        ok = np.array([whole[i] not in problems for i in range(len(kept))], dtype=bool)
        if ok.any():
            numeric = checked.numeric[ok]
            categorical = {name: values[ok] for name, values in checked.categorical.items()}
            good = [whole[i] for i in np.flatnonzero(ok).tolist()]
            ids = [records[i][id_at] for i in good] if id_at is not None else None
            proba, churn = engine.score_columns(
                numeric, categorical, route=JOBS, job_id=job_id, row_numbers=rows[good], customer_ids=ids
            )
            for k, (i, p, d) in enumerate(zip(good, proba.tolist(), churn.tolist(), strict=True)):
                entry: dict[str, Any] = {"row": int(rows[i])}
                if ids is not None:
                    entry[ID_COLUMN] = ids[k]
                entry["churn_probability"] = p
                entry["will_churn"] = d
                scored.append(entry)
    errors = []
    for i in sorted(problems):
        entry = {"row": int(rows[i])}
        if id_at is not None:
            entry[ID_COLUMN] = records[i][id_at] if id_at < len(records[i]) else None
        entry["error"] = "; ".join(problems[i])
        errors.append(entry)
    return ChunkResult(predictions=_fragment(scored), errors=_fragment(errors), scored=len(scored), failed=len(errors))


def _fragment(entries: list[dict[str, Any]], step: int = 1000) -> bytes:
    """JSON array contents, encoded a slice at a time: each call holds the GIL only briefly,
    so an event loop sharing the process is never kept waiting long."""
    return b",".join(
        orjson.dumps(entries[i : i + step])[1:-1] for i in range(0, len(entries), step) if entries[i : i + step]
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
