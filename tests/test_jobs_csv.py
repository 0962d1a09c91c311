"""The sync core of a scoring job: reducing an upload (hostile files included), scoring a
chunk, writing the result as CSV safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import io
import tempfile
import tracemalloc

import orjson
import pytest

from harness.data import customers_csv
from models.predictor import load_predictor
from models.schema import EXAMPLE_CUSTOMER, FEATURE_NAMES, row_values
from serving.engine import Engine
from serving.jobs.csvfile import (
    CHUNK_BYTES,
    MAX_CELL_CHARS,
    CsvRejected,
    Upload,
    chunk_as_csv,
    neutralise,
    read_chunk,
    reduce_upload,
    score_chunk,
)
from serving.settings import Settings

HEADER = ["CustomerId", *FEATURE_NAMES]
GOOD = [str(EXAMPLE_CUSTOMER[n]) for n in FEATURE_NAMES]
HEAD = ",".join(HEADER).encode()


@pytest.fixture(scope="module")
def predictor(trained):
    return load_predictor(trained.model)


@pytest.fixture(scope="module")
def engine(predictor):
    engine = Engine(predictor, Settings(prediction_log_sink="off"))
    yield engine
    engine.shutdown()


def csv_bytes(rows: list[list[str]], header: list[str] = HEADER) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    return out.getvalue().encode()


def reduce(data: bytes, max_rows: int = 200_000, chunk_rows: int = 5000) -> tuple[Upload, list[list[list[str]]]]:
    with tempfile.TemporaryFile() as out:
        upload = reduce_upload(io.BytesIO(data), max_rows, chunk_rows, out)
        return upload, [read_chunk(upload.chunk(i)) for i in range(len(upload.chunks))]


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"CustomerId,Age\n1,40\n", 400, "missing column(s): CreditScore, Geography"),
        (",".join(FEATURE_NAMES).encode("utf-16"), 400, "not UTF-8 text (byte 0xff at offset 0)"),
        ((",".join(FEATURE_NAMES) + "\n\n\n").encode(), 400, "no data rows"),
        (b"", 400, "missing column(s)"),
    ],
    ids=["missing-columns", "utf16", "blank-lines-only", "empty"],
)
def test_what_cannot_be_scored_is_refused(data, status, message):
    with pytest.raises(CsvRejected) as caught:
        reduce(data, 10)
    assert message in str(caught.value) and caught.value.status == status


def test_a_bom_is_read_past():
    upload, _ = reduce(("\ufeff" + ",".join(FEATURE_NAMES) + "\n" + ",".join(GOOD) + "\n").encode())
    assert (upload.rows, upload.has_customer_id) == (1, False)


def test_rows_are_records_numbered_from_one_blank_lines_skipped():
    good = ",".join(GOOD)
    quoted = ",".join([GOOD[0], '"Fra\nnce"', *GOOD[2:]])  # a newline inside a quoted field
    data = f"{','.join(HEADER)}\n1,{good}\n7,{quoted}\n\n\n9,{good}\n".encode()
    upload, (chunk,) = reduce(data)
    assert (upload.rows, upload.has_customer_id) == (3, True)
    assert [(r[0], r[2], r[4]) for r in chunk] == [("1", "1", "France"), ("2", "7", "Fra\nnce"), ("3", "9", "France")]
    with pytest.raises(CsvRejected) as caught:
        reduce(data, max_rows=2)
    assert caught.value.status == 413 and "at least 3 data rows" in str(caught.value)


def test_only_the_models_columns_and_the_customer_id_are_kept_in_schema_order():
    header = ["RowNumber", "Surname", "Age", "CustomerId", *[n for n in FEATURE_NAMES if n != "Age"], "Exited"]
    values = dict(zip(FEATURE_NAMES, GOOD, strict=True))
    row = ["1", "Hargrave", values["Age"], "15634602", *[values[n] for n in FEATURE_NAMES if n != "Age"], "1"]
    _, (chunk,) = reduce(csv_bytes([row], header))
    assert chunk == [["1", "", "15634602", *GOOD]]  # Surname, RowNumber and Exited are gone


def test_chunks_are_bounded_by_rows_and_by_bytes_and_keep_every_row_once():
    upload, chunks = reduce(customers_csv(23), chunk_rows=5)
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]
    assert [int(r[0]) for c in chunks for r in c] == list(range(1, 24))
    # rows of the longest kept cells fill CHUNK_BYTES long before 5,000 rows
    wide = [["x" * MAX_CELL_CHARS] * len(HEADER)] * 2000  # ~1.2 kB a reduced row
    upload, chunks = reduce(csv_bytes(wide))
    assert len(chunks) == 3 and all(length <= CHUNK_BYTES + 4096 for _, length in upload.chunks)
    assert sum(len(c) for c in chunks) == 2000


HUGE = 40 << 20  # hostile files of 40 MiB and more


def _hostile() -> list[tuple[str, bytes, str]]:
    row = ",".join(["1", *GOOD]).encode()
    return [
        ("commas", b"," * HUGE, "the header (line 1) is longer than 1,048,576 characters"),
        ("million-column-header", b",".join(b"c%d" % i for i in range(1_000_000)), "the header (line 1) is longer"),
        ("columns-under-the-record-limit", b"," * 100_000 + b"\n" + row, "the header has 100,001 columns"),
        ("wide-rows", HEAD + b"\n" + (b"," * 5000 + b"\n") * 8000, "data row 1 (line 2) has 5,001 fields"),
        ("60-MiB-field", HEAD + b"\n" + b"x" * (60 << 20) + b"\n", "data row 1 (line 2) is longer than"),
        ("quoted-field", HEAD + b'\n"' + b"x\n" * (HUGE // 2), "a field is longer than 131,072 characters"),
        ("unbalanced-quote", HEAD + b"\n" + row + b'\n"1,2,3\n' + row, "ends inside a quoted field"),
        ("stray-quote", HEAD + b"\n" + row + b'\n"1"x,2\n', "',' expected after '\"'"),
        ("blank-lines", HEAD + b"\n" + b"\n" * HUGE, "blank lines and 0 data rows"),
        (
            "not-utf8-later",
            HEAD + b"\n" + row + b"\n" + row.replace(b"France", b"Fr\xe9nce"),
            "byte 0xe9 at offset 167",
        ),
    ]


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in _hostile()], ids=[c[0] for c in _hostile()])
def test_hostile_files_are_refused_naming_the_problem_in_bounded_memory(data, message):
    tracemalloc.start()
    try:
        with pytest.raises(CsvRejected) as caught:
            reduce(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.status == 400 and message in str(caught.value), str(caught.value)
    assert peak < 16 << 20, f"{peak / 2**20:.1f} MiB traced while reading a {len(data) / 2**20:.0f} MiB file"


def test_an_overlong_cell_makes_its_row_an_error_and_is_not_kept(engine, predictor):
    rows = [["1", *GOOD], ["7" * 500, *GOOD], ["3", *GOOD[:3], "4" * 5000, *GOOD[4:]]]
    _, (chunk,) = reduce(csv_bytes(rows))
    assert max(len(cell) for record in chunk for cell in record[2:]) == MAX_CELL_CHARS  # the id, cut
    result = score_chunk(engine, chunk, with_id=True, job_ref="job-1")
    errors = orjson.loads(b"[" + result.errors + b"]")
    assert (result.scored, [e["row"] for e in errors]) == (1, [2, 3])
    assert errors[0]["error"] == f"CustomerId: a cell of 500 characters (at most {MAX_CELL_CHARS})"
    assert errors[0]["CustomerId"] == "7" * MAX_CELL_CHARS
    assert errors[1]["error"] == f"Age: a cell of 5,000 characters (at most {MAX_CELL_CHARS})"


def test_a_chunk_scores_valid_rows_like_the_model_and_reports_each_bad_one(engine, predictor):
    rows = [
        ["1", *GOOD],
        ["2", *GOOD[:3], "old", *GOOD[4:]],  # Age: not a number
        ["3", *GOOD[:5], "-5", *GOOD[6:]],  # Balance: below the range
        ["4", *GOOD[:1], "Atlantis", *GOOD[2:]],  # Geography: not a category
        ["5", *GOOD[:3], "", *GOOD[4:7], "2", *GOOD[8:]],  # Age empty and HasCrCard not a flag
        ["6", *GOOD, "extra"],  # one field too many
        ["7", *GOOD[:3], " 43 ", *GOOD[4:]],  # spaces around a number: fine
        ["8", *GOOD[:3], "42.0", *GOOD[4:]],  # an integral float for an integer: fine
    ]
    _, (chunk,) = reduce(csv_bytes(rows))
    result = score_chunk(engine, chunk, with_id=True, job_ref="job-1")
    predictions = orjson.loads(b"[" + result.predictions + b"]")
    errors = orjson.loads(b"[" + result.errors + b"]")
    assert (result.scored, result.failed) == (3, 5)
    assert [(p["row"], p["CustomerId"]) for p in predictions] == [(1, "1"), (7, "7"), (8, "8")]
    expected = predictor.predict_rows([row_values(EXAMPLE_CUSTOMER), row_values({**EXAMPLE_CUSTOMER, "Age": 43})])
    assert [p["churn_probability"] for p in predictions] == [expected[0], expected[1], expected[0]]
    assert [p["will_churn"] for p in predictions] == [
        p["churn_probability"] >= predictor.threshold for p in predictions
    ]
    by_row = {e["row"]: e["error"] for e in errors}
    assert list(by_row) == [2, 3, 4, 5, 6]
    assert (
        by_row[2].startswith("Age: ")
        and "unable to parse 'old'" in by_row[2]
        and "an integer in [18, 100]" in by_row[2]
    )
    assert by_row[3].startswith("Balance: Input should be greater than or equal to 0")
    assert by_row[4].startswith("Geography: Input should be 'France', 'Germany' or 'Spain'")
    assert "Age: " in by_row[5] and "empty cell" in by_row[5] and "HasCrCard: " in by_row[5]
    assert by_row[6] == f"wrong number of fields on this line ({len(HEADER) + 1}, the header has {len(HEADER)})"
    assert {e["CustomerId"] for e in errors} == {"2", "3", "4", "5", "6"}
    lines = list(csv.reader(io.StringIO(chunk_as_csv(result.predictions, result.errors, with_id=True).decode())))
    assert [line[0] for line in lines] == [str(r) for r in range(1, 9)], "CSV lines in row order"
    assert lines[0][4] == "" and lines[0][3] in ("true", "false") and float(lines[0][2]) == expected[0]
    assert lines[1][2:4] == ["", ""] and lines[1][4].startswith("Age: ")


def test_a_repeated_column_is_read_from_its_first_occurrence(engine, predictor):
    header = [*FEATURE_NAMES, "Age"]
    _, (chunk,) = reduce(csv_bytes([[*GOOD, "999"]], header))
    result = score_chunk(engine, chunk, with_id=False, job_ref="job-1")
    assert (result.scored, result.failed) == (1, 0)
    (prediction,) = orjson.loads(b"[" + result.predictions + b"]")
    assert set(prediction) == {"row", "churn_probability", "will_churn"}


@pytest.mark.parametrize(
    ("cell", "shown"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("15634602", "15634602"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_csv_cells_a_spreadsheet_would_run_are_neutralised(cell, shown):
    assert neutralise(cell) == shown


def test_formula_ids_and_error_text_come_out_as_text_in_the_csv_result(engine, predictor):
    rows = [['=HYPERLINK("http://evil")', *GOOD], ["@SUM(1)", *GOOD[:3], "=1+1", *GOOD[4:]]]
    _, (chunk,) = reduce(csv_bytes(rows))
    result = score_chunk(engine, chunk, with_id=True, job_ref="job-1")
    text = chunk_as_csv(result.predictions, result.errors, with_id=True).decode()
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[0][1] == '\'=HYPERLINK("http://evil")' and lines[1][1] == "'@SUM(1)"
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for line in lines for cell in line)
    # JSON is unchanged: the client's own strings
    assert orjson.loads(b"[" + result.predictions + b"]")[0]["CustomerId"] == '=HYPERLINK("http://evil")'
