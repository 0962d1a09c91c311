"""CSV scoring, the sync core of a job: reduce an upload, then score it chunk by chunk.

An upload is read once, streaming, from a temporary file (`reduce_upload`), with every
bound a hostile file could push against checked as it is read: bytes per record, columns,
characters per kept cell, rows. What is kept is the *reduced* upload: for each data row its
row number, the problem that makes it unscorable (if any), `CustomerId` and the model's
feature columns, in a fixed order, cut into chunks of at most `chunk_rows` rows and about
CHUNK_BYTES bytes. Nothing else of the file (names, addresses, unused columns) is ever
stored, and a worker holds one reduced chunk at a time: its memory is bounded by the chunk,
whatever the upload looked like.

Rows are numbered like the file's data rows, from 1 (blank lines are skipped, as
`csv.reader` yields them empty); the numbers travel with the reduced rows, so the result
names every row of the upload exactly once. Everything here is plain blocking code: it runs
on the jobs' own low-priority threads.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import orjson

from models.columns import number_cells, validate_columns
from models.schema import BY_NAME, FEATURE_NAMES, ID_COLUMN
from serving import telemetry
from serving.engine import JOBS, Engine

# Bounds of an upload. Each names a problem a client is told about in a 400.
MAX_RECORD_CHARS = 1 << 20  # one CSV record (a row, quoted line breaks included)
MAX_COLUMNS = 1024  # fields of the header or of any row
MAX_CELL_CHARS = 100  # a kept cell: a feature value or a CustomerId is far shorter (longer: the row is reported)
# Blank lines are skipped, but each costs a parser step: a file of nothing but line breaks
# would keep a thread busy for half a minute. A blank line after every row (\r\r\n endings)
# is normal; more than that, plus this slack, is not a CSV of customers.
MAX_EXTRA_BLANK_LINES = 10_000
# csv's own limit on one field (131,072 characters), kept at its default on purpose: it is
# process-wide, and a field this long is refused anyway.
MAX_FIELD_CHARS = csv.field_size_limit()
# A chunk of the reduced upload closes at chunk_rows rows or this many bytes, whichever
# comes first: a worker's memory per chunk is bounded by this, not by the file.
CHUNK_BYTES = 1 << 20
READ_BYTES = 1 << 16

# The reduced upload's fixed leading columns; then CustomerId (if the file has one) and the
# features in FEATURE_NAMES order.
ROW, PROBLEM = 0, 1


class CsvRejected(ValueError):
    """The upload as a whole cannot be scored; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """A checked, reduced upload: its row count and where each chunk lies in `data`."""

    rows: int
    has_customer_id: bool
    chunks: tuple[tuple[int, int], ...]  # (offset, length) of each chunk in `data`
    data: IO[bytes]  # the reduced chunks, back to back (a temporary file)

    def chunk(self, index: int) -> bytes:
        offset, length = self.chunks[index]
        self.data.seek(offset)
        return self.data.read(length)


class _Records:
    """The physical lines of a text file, for csv.reader, refusing a record longer than
    MAX_RECORD_CHARS *before* it is in memory (readline is given the limit)."""

    def __init__(self, text: IO[str]):
        self.text = text
        self.pending = 0  # characters read for the record being parsed
        self.first_line = 1  # the line it starts on

    def __iter__(self) -> _Records:
        return self

    def __next__(self) -> str:
        line = self.text.readline(MAX_RECORD_CHARS + 1 - self.pending)
        if not line:
            raise StopIteration
        self.pending += len(line)
        if self.pending > MAX_RECORD_CHARS:
            raise _TooLong
        return line


class _TooLong(Exception):
    """A record over MAX_RECORD_CHARS (raised through csv.reader, which passes it on)."""


def _csv_problem(exc: csv.Error) -> str:
    text = str(exc)
    if text.startswith("field larger than field limit"):
        return f"a field is longer than {MAX_FIELD_CHARS:,} characters (an unclosed quote?)"
    if text == "unexpected end of data":
        return "the file ends inside a quoted field (an unclosed quote)"
    return text


def reduce_upload(source: IO[bytes], max_rows: int, chunk_rows: int, out: IO[bytes]) -> Upload:
    """Check an upload and write its reduced form to `out` (see the module docstring).

    Refuses (CsvRejected) what cannot become a job: not UTF-8, unreadable CSV (an unclosed
    quote, a record over MAX_RECORD_CHARS, over MAX_COLUMNS fields), a missing feature column,
    no data rows (400), more than max_rows data rows (413). A row with the wrong number of
    fields or a kept cell over MAX_CELL_CHARS is kept as a reported row, without its values. Stops at the first such problem: a hostile file is refused after reading at
    most the bytes that show the problem. Memory: one record and one chunk."""
    text = io.TextIOWrapper(source, encoding="utf-8-sig", errors="strict", newline="")
    lines = _Records(text)
    reader = csv.reader(lines, strict=True)
    rows = 0  # data rows read so far
    blanks = 0
    header: list[str] | None = None

    def where(row: int) -> str:
        line = f"line {lines.first_line}"
        return f"the header ({line})" if header is None else f"data row {row} ({line})"

    try:
        header = _next_record(reader, lines) or []
        if len(header) > MAX_COLUMNS:
            raise CsvRejected(f"the header has {len(header):,} columns; at most {MAX_COLUMNS:,} are read")
        missing = [name for name in FEATURE_NAMES if name not in header]
        if missing:
            shown = ", ".join(h[:40] for h in header[:20]) + (", ..." if len(header) > 20 else "")
            raise CsvRejected(
                f"missing column(s): {', '.join(missing)} (the header has: {shown or 'nothing'}); "
                f"required: {', '.join(FEATURE_NAMES)}"
            )
        has_id = ID_COLUMN in header
        kept_names = ([ID_COLUMN] if has_id else []) + list(FEATURE_NAMES)
        positions = [header.index(name) for name in kept_names]  # the first of a repeated column
        id_at = header.index(ID_COLUMN) if has_id else None
        width = len(header)
        chunks = _ChunkWriter(out, chunk_rows)
        while (record := _next_record(reader, lines)) is not None:
            if not record:  # a blank line: not a data row
                blanks += 1
                if blanks > rows + MAX_EXTRA_BLANK_LINES:
                    raise CsvRejected(
                        f"the file has {blanks:,} blank lines and {rows:,} data rows: not a CSV of customers"
                    )
                continue
            rows += 1
            if rows > max_rows:
                raise CsvRejected(
                    f"the file has at least {rows} data rows; a job takes at most {max_rows} "
                    "(BANKCHURN_MAX_CSV_ROWS): split it",
                    status=413,
                )
            if len(record) > MAX_COLUMNS:
                raise CsvRejected(f"{where(rows)} has {len(record):,} fields; at most {MAX_COLUMNS:,} are read")
            if len(record) == width:
                kept = [record[p] for p in positions]
                problem = ""
            else:
                customer_id = record[id_at] if id_at is not None and id_at < len(record) else ""
                kept = ([customer_id] if has_id else []) + [""] * len(FEATURE_NAMES)
                problem = f"wrong number of fields on this line ({len(record)}, the header has {width})"
            long = [name for name, cell in zip(kept_names, kept, strict=True) if len(cell) > MAX_CELL_CHARS]
            if long:
                # No value of these columns is that long: the row is reported, and the cells are
                # not kept (a worker's chunk stays small whatever the file holds).
                problem = "; ".join(
                    f"{name}: a cell of {len(kept[kept_names.index(name)]):,} characters (at most {MAX_CELL_CHARS})"
                    for name in long
                )
                kept = [
                    cell[:MAX_CELL_CHARS] if name == ID_COLUMN else ""
                    for name, cell in zip(kept_names, kept, strict=True)
                ]
            chunks.add([str(rows), problem, *kept])
    except _TooLong:
        raise CsvRejected(f"{where(rows + 1)} is longer than {MAX_RECORD_CHARS:,} characters") from None
    except UnicodeDecodeError as exc:
        # The decoder works on blocks of the file, so the row is not known; the offset is.
        offset = source.tell() - len(exc.object) + exc.start
        raise CsvRejected(
            f"the file is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {offset:,}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise CsvRejected(f"unreadable CSV at {where(rows + 1)}: {_csv_problem(exc)}") from None
    finally:
        text.detach()  # `source` stays open: its owner closes it
    if rows == 0:
        raise CsvRejected("the file has a header but no data rows")
    return Upload(rows=rows, has_customer_id=has_id, chunks=chunks.close(), data=out)


def _next_record(reader: Any, lines: _Records) -> list[str] | None:
    lines.pending = 0
    lines.first_line = reader.line_num + 1
    return next(reader, None)


class _ChunkWriter:
    """Reduced rows as CSV, cut into chunks (rows and bytes bounded), appended to `out`."""

    def __init__(self, out: IO[bytes], chunk_rows: int):
        self.out = out
        self.chunk_rows = chunk_rows
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer, lineterminator="\n")
        self.rows = 0
        self.offsets: list[tuple[int, int]] = []
        self.position = 0

    def add(self, row: list[str]) -> None:
        self.writer.writerow(row)
        self.rows += 1
        if self.rows >= self.chunk_rows or self.buffer.tell() >= CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        blob = self.buffer.getvalue().encode()
        self.out.write(blob)
        self.offsets.append((self.position, len(blob)))
        self.position += len(blob)
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer, lineterminator="\n")
        self.rows = 0

    def close(self) -> tuple[tuple[int, int], ...]:
        self._flush()
        self.out.flush()
        return tuple(self.offsets)


@dataclass(frozen=True)
class ChunkResult:
    """A scored chunk: its predictions and errors as JSON array *contents* (no brackets), so
    the result of a whole job is streamed by joining chunks, never parsed and re-encoded."""

    predictions: bytes
    errors: bytes
    scored: int
    failed: int


def read_chunk(blob: bytes) -> list[list[str]]:
    """A reduced chunk's rows: [row, problem, (CustomerId,) features...]."""
    return list(csv.reader(io.StringIO(blob.decode(), newline="")))


def score_chunk(engine: Engine, records: list[list[str]], with_id: bool, job_ref: str) -> ChunkResult:
    """Validate a reduced chunk's rows against the schema (vectorised, columns at a time),
    score the valid ones in one model call (the engine's, on this thread; logged under the
    job's ref), report each invalid one with every problem it has."""
    first = 3 if with_id else 2  # the first feature column
    rows = [int(record[ROW]) for record in records]
    problems: dict[int, list[str]] = {i: [record[PROBLEM]] for i, record in enumerate(records) if record[PROBLEM]}
    whole = [i for i in range(len(records)) if i not in problems]
    scored: list[dict[str, Any]] = []
    with telemetry.stage("csv_validate"):
        kept = [records[i] for i in whole]
        width = first + len(FEATURE_NAMES)
        by_column = list(zip(*kept, strict=True)) if kept else [()] * width  # transposed in C
        columns: dict[str, Any] = {}
        for offset, name in enumerate(FEATURE_NAMES, start=first):
            feature = BY_NAME[name]
            if feature.kind == "category":
                columns[name] = np.array(list(map(str.strip, by_column[offset])), dtype=object)
                continue
            cells = by_column[offset]  # float() ignores surrounding whitespace itself
            columns[name], unparsable = number_cells(cells, feature)
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
            ids = [records[i][2] for i in good] if with_id else None
            proba, churn = engine.score_columns(
                numeric,
                categorical,
                route=JOBS,
                job_id=job_ref,
                row_numbers=np.array([rows[i] for i in good]),
                customer_ids=ids,
            )
            for k, (i, p, d) in enumerate(zip(good, proba.tolist(), churn.tolist(), strict=True)):
                entry: dict[str, Any] = {"row": rows[i]}
                if ids is not None:
                    entry[ID_COLUMN] = ids[k]
                entry["churn_probability"] = p
                entry["will_churn"] = d
                scored.append(entry)
    errors = []
    for i in sorted(problems):
        entry = {"row": rows[i]}
        if with_id:
            entry[ID_COLUMN] = records[i][2]
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
# A spreadsheet reads a cell starting with one of these as a formula (=HYPERLINK(...),
# +cmd|..., @SUM(...)); tab and carriage return can hide the same. OWASP's advice for CSV
# export: prefix such cells with a single quote, which makes them text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """A client-controlled cell made safe to open in a spreadsheet (see FORMULA_STARTS)."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def csv_header(with_id: bool) -> bytes:
    columns = [c for c in CSV_COLUMNS if with_id or c != ID_COLUMN]
    return (",".join(columns) + "\r\n").encode()


def chunk_as_csv(predictions: bytes, errors: bytes, with_id: bool) -> bytes:
    """One chunk of a result as CSV lines, in row order (predictions and errors merged).
    CustomerId and the error text are the client's own strings: neutralised (FORMULA_STARTS)."""
    lines = orjson.loads(b"[" + predictions + b"]") + orjson.loads(b"[" + errors + b"]")
    lines.sort(key=lambda entry: entry["row"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    for entry in lines:
        row = [entry["row"]]
        if with_id:
            row.append(neutralise(entry.get(ID_COLUMN) or ""))
        if "error" in entry:
            row += ["", "", neutralise(entry["error"])]
        else:
            row += [repr(entry["churn_probability"]), "true" if entry["will_churn"] else "false", ""]
        writer.writerow(row)
    return out.getvalue().encode()
