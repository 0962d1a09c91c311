"""The sync core of a scoring job: checking an upload, cutting it into chunks, scoring a chunk."""

from __future__ import annotations

import csv
import io

import orjson
import pytest

from harness.data import customers_csv
from models.predictor import load_predictor
from models.schema import EXAMPLE_CUSTOMER, FEATURE_NAMES, row_values
from serving.engine import Engine
from serving.jobs.csvfile import Chunks, CsvRejected, chunk_as_csv, inspect_upload, score_chunk
from serving.settings import Settings

HEADER = ["CustomerId", *FEATURE_NAMES]
GOOD = [str(EXAMPLE_CUSTOMER[n]) for n in FEATURE_NAMES]


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


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"CustomerId,Age\n1,40\n", 400, "missing column(s): CreditScore, Geography"),
        ("\ufeff" + ",".join(FEATURE_NAMES) + "\n" + ",".join(GOOD) + "\n", None, None),  # BOM: fine
        (",".join(FEATURE_NAMES).encode("utf-16"), 400, "not UTF-8"),
        ((",".join(FEATURE_NAMES) + "\n\n\n").encode(), 400, "no data rows"),
        (b"", 400, "missing column(s)"),
    ],
    ids=["missing-columns", "bom", "utf16", "blank-lines-only", "empty"],
)
def test_inspect_upload_refuses_what_cannot_be_scored(data, status, message):
    data = data.encode() if isinstance(data, str) else data
    if status is None:
        assert inspect_upload(data, 10).rows == 1
        return
    with pytest.raises(CsvRejected, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        inspect_upload(data, 10)
    assert caught.value.status == status


def test_inspect_upload_counts_records_not_lines():
    good = ",".join(GOOD)
    quoted = ",".join([GOOD[0], '"Fra\nnce"', *GOOD[2:]])  # a newline inside a quoted field
    data = f"{','.join(HEADER)}\n1,{good}\n7,{quoted}\n\n\n9,{good}\n".encode()
    upload = inspect_upload(data, 10)
    assert (upload.rows, upload.has_customer_id) == (3, True)
    with pytest.raises(CsvRejected) as caught:
        inspect_upload(data, 2)
    assert caught.value.status == 413 and "3 data rows" in str(caught.value)


def test_chunks_are_the_same_on_every_worker_and_skip_what_is_done():
    data = customers_csv(23)
    every = []
    chunks = Chunks(data, 5)
    while (chunk := chunks.next_chunk(set())) is not None:
        every.append(chunk)
    assert [(i, first, len(recs)) for i, first, recs in every] == [
        (0, 1, 5),
        (1, 6, 5),
        (2, 11, 5),
        (3, 16, 5),
        (4, 21, 3),
    ]
    resumed = Chunks(data, 5)
    rest = []
    while (chunk := resumed.next_chunk({0, 1, 3})) is not None:
        rest.append(chunk)
    assert rest == [every[2], every[4]]


def test_a_chunk_scores_valid_rows_like_the_model_and_reports_each_bad_one(predictor, engine):
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
    result = score_chunk(engine, HEADER, 101, rows, with_id=True, job_id="job-1")
    predictions = orjson.loads(b"[" + result.predictions + b"]")
    errors = orjson.loads(b"[" + result.errors + b"]")
    assert (result.scored, result.failed) == (3, 5)
    assert [(p["row"], p["CustomerId"]) for p in predictions] == [(101, "1"), (107, "7"), (108, "8")]
    expected = predictor.predict_rows([row_values(EXAMPLE_CUSTOMER), row_values({**EXAMPLE_CUSTOMER, "Age": 43})])
    assert [p["churn_probability"] for p in predictions] == [expected[0], expected[1], expected[0]]
    assert [p["will_churn"] for p in predictions] == [
        p["churn_probability"] >= predictor.threshold for p in predictions
    ]
    by_row = {e["row"]: e["error"] for e in errors}
    assert list(by_row) == [102, 103, 104, 105, 106]
    assert (
        by_row[102].startswith("Age: ")
        and "unable to parse 'old'" in by_row[102]
        and "an integer in [18, 100]" in by_row[102]
    )
    assert by_row[103].startswith("Balance: Input should be greater than or equal to 0")
    assert by_row[104].startswith("Geography: Input should be 'France', 'Germany' or 'Spain'")
    assert "Age: " in by_row[105] and "empty cell" in by_row[105] and "HasCrCard: " in by_row[105]
    assert by_row[106] == f"wrong number of fields on this line ({len(HEADER) + 1}, the header has {len(HEADER)})"
    lines = list(csv.reader(io.StringIO(chunk_as_csv(result.predictions, result.errors, with_id=True).decode())))
    assert [line[0] for line in lines] == [str(r) for r in range(101, 109)], "CSV lines in row order"
    assert lines[0][4] == "" and lines[0][3] in ("true", "false") and float(lines[0][2]) == expected[0]
    assert lines[1][2:4] == ["", ""] and lines[1][4].startswith("Age: ")


def test_a_repeated_column_is_read_from_its_first_occurrence(engine):
    header = [*FEATURE_NAMES, "Age"]
    result = score_chunk(engine, header, 1, [[*GOOD, "999"]], with_id=False, job_id="job-1")
    assert (result.scored, result.failed) == (1, 0)
    (prediction,) = orjson.loads(b"[" + result.predictions + b"]")
    assert set(prediction) == {"row", "churn_probability", "will_churn"}
