"""The prediction log in-process: the record, the writer thread, the file sink's rotation and
retention, sampling, drops, and request ids (serving.requestid)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from harness.servers import metric
from models.schema import EXAMPLE_CUSTOMER, FEATURE_NAMES, NUMERIC_FEATURES, row_values
from serving import requestid
from serving.predictionlog.records import FIELDS, HEAD, OUTPUTS, PredictionRecord
from serving.predictionlog.sinks import FileSink, iso_time, read_files
from serving.predictionlog.writer import PredictionLog, Scored

ROW = row_values(EXAMPLE_CUSTOMER)
OLDER = row_values({**EXAMPLE_CUSTOMER, "Age": 61, "Geography": "Germany", "Balance": 1234.5})
MODEL = "bank_churn:testversion"


def file_log(directory, **kwargs) -> PredictionLog:
    return PredictionLog(FileSink(directory, retention_s=3600, max_bytes=1 << 30), MODEL, interval=0.01, **kwargs)


def read_all(directory) -> list[PredictionRecord]:
    return [r for batch in read_files(directory, since=0) for r in batch]


def dropped(reason: str) -> float:
    from prometheus_client import REGISTRY, generate_latest

    return metric(generate_latest(REGISTRY).decode(), "bank_churn_prediction_log_dropped_rows_total", 0, reason=reason)


def test_record_fields_are_the_head_the_ten_features_and_the_outputs():
    assert (*HEAD, *FEATURE_NAMES, *OUTPUTS) == FIELDS
    assert HEAD == ("time", "model_version", "route", "request_id", "job_id", "row", "CustomerId")


def test_each_shape_of_scored_batch_becomes_one_record_per_row(tmp_path):
    log = file_log(tmp_path).start()
    now = time.time()
    # coalesced single rows: a route and a request id per row
    log.add(
        Scored(
            now, np.array([0.1, 0.9]), np.array([False, True]), ("/predict", "/v2/x"), ("r1", "r2"), rows=(ROW, OLDER)
        )
    )
    # a many-row request: one route and id, positions 1..n
    log.add(
        Scored(
            now,
            np.array([0.2, 0.3]),
            np.array([False, True]),
            "/predict_batch",
            "r3",
            rows=[ROW, OLDER],
            row_numbers=range(1, 3),
        )
    )
    # a job's columns (float64 numbers, as a CSV or a V2 tensor gives them), with CustomerIds
    numeric = np.array([[ROW[FEATURE_NAMES.index(n)] for n in NUMERIC_FEATURES]] * 2, dtype=np.float64)
    categorical = {
        "Geography": np.array(["Spain", "France"], dtype=object),
        "Gender": np.array(["Male", "Female"], dtype=object),
    }
    ids = ["15634602", "x" * 500]
    log.add(Scored(now, np.array([0.4, 0.5]), np.array([True, True]), "/jobs", columns=(numeric, categorical), job_id="j1", row_numbers=np.array([17, 18]), customer_ids=ids))  # fmt: skip
    log.close()
    records = read_all(tmp_path)
    assert len(records) == 6
    single, v2, batch1, batch2, job1, job2 = records
    assert (single.route, single.request_id, single.row, single.job_id) == ("/predict", "r1", None, None)
    assert (v2.route, v2.request_id, v2.Age, v2.Geography, v2.Balance) == ("/v2/x", "r2", 61, "Germany", 1234.5)
    assert (v2.churn_probability, v2.will_churn) == (0.9, True)
    assert [(r.request_id, r.row) for r in (batch1, batch2)] == [("r3", 1), ("r3", 2)]
    assert batch2.will_churn is True and batch2.churn_probability == 0.3, "the decision is the engine's, as given"
    assert (job1.job_id, job1.row, job1.request_id, job1.CustomerId) == ("j1", 17, None, "15634602")
    assert len(job2.CustomerId) == 64, "a CustomerId is cut, not copied whole"
    assert type(job1.CreditScore) is int and type(job1.Age) is int and job1.Geography == "Spain"
    assert all(r.model_version == MODEL and r.time == iso_time(now) for r in records)
    raw = next(tmp_path.glob("predictions-*.jsonl")).read_text().splitlines()[0]
    assert (
        raw.startswith('{"time":"') and '"request_id":"r1"' in raw and "job_id" not in raw and "CustomerId" not in raw
    )


def test_sampling_keeps_about_the_sampled_share(tmp_path):
    log = file_log(tmp_path, sample=0.25).start()
    n = 20_000
    for _ in range(n // 1000):
        log.add(Scored(time.time(), np.full(1000, 0.5), np.ones(1000, bool), "/predict_batch", "r", rows=[ROW] * 1000))
    log.close()
    kept = len(read_all(tmp_path))
    sigma = (n * 0.25 * 0.75) ** 0.5
    assert abs(kept - n * 0.25) < 5 * sigma, kept


def test_a_full_queue_drops_and_counts_instead_of_growing(tmp_path):
    log = file_log(tmp_path, max_rows=1000)  # no writer thread: nothing leaves the queue
    before = dropped("queue_full")
    for _ in range(3):
        log.add(Scored(time.time(), np.full(400, 0.5), np.ones(400, bool), "/predict_batch", "r", rows=[ROW] * 400))
    assert log.queued_rows == 800 and len(log._queue) == 2
    assert dropped("queue_full") - before == 400


def test_a_failing_sink_drops_and_counts_and_is_retried(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log directory should be")
    log = file_log(blocker).start()
    before = dropped("sink_error")
    log.add(Scored(time.time(), np.array([0.5]), np.array([True]), "/predict", "r", rows=[ROW]))
    assert log.flush()
    assert dropped("sink_error") - before == 1 and log.sink_up == 0
    blocker.unlink()  # the sink comes back
    time.sleep(log.retry_s)
    log.add(Scored(time.time(), np.array([0.5]), np.array([True]), "/predict", "r", rows=[ROW]))
    log.close()
    assert log.sink_up == 1 and len(read_all(blocker)) == 1


def test_files_rotate_and_retention_deletes_the_oldest_first(tmp_path):
    sink = FileSink(tmp_path, retention_s=3600, max_bytes=6000, rotate_bytes=1000)
    records = [PredictionRecord(iso_time(time.time()), MODEL, "/predict", "r", None, None, None, *ROW, 0.5, True)] * 4
    for _ in range(12):
        sink.write(records)  # ~1.6 KB a write: each write after the first starts a new file
    files = sorted(tmp_path.glob("predictions-*.jsonl"))
    assert sum(f.stat().st_size for f in files) <= 6000 + 2000, "the byte budget holds (plus the open file)"
    stale = files[0]
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert sink.enforce_retention() >= 1 and not stale.exists(), "files past the retention are deleted"
    current = sink._file.name
    sink.max_bytes = 1
    sink.enforce_retention()
    assert [str(p) for p in tmp_path.glob("predictions-*.jsonl")] == [current], "never the file being written"
    sink.close()


def test_written_log_pages_leave_the_page_cache():
    # Under the repository (a disk), not tmp_path: on a tmpfs /tmp the pages are the file.
    build = Path(__file__).resolve().parents[1] / "build"
    build.mkdir(exist_ok=True)
    directory = Path(tempfile.mkdtemp(dir=build, prefix="page-cache-"))
    try:
        sink = FileSink(directory, retention_s=3600, max_bytes=1 << 40)
        records = [PredictionRecord(iso_time(time.time()), MODEL, "/jobs", None, "j", 1, None, *ROW, 0.5, True)] * 2048
        for _ in range(20):  # ~15 MB in 0.75 MB writes; the last write's pages stay until the next
            sink.write(records)
        (path,) = directory.glob("predictions-*.jsonl")
        resident, size = map(int, subprocess.check_output(["fincore", "-b", "-n", "-o", "RES,SIZE", str(path)]).split())
        sink.close()
        assert size > 10_000_000
        assert resident < size / 4, f"{resident:,} of {size:,} bytes still cached: written pages are dropped"
    finally:
        shutil.rmtree(directory)


def test_reading_a_window_and_a_line_cut_short(tmp_path):
    sink = FileSink(tmp_path, retention_s=3600, max_bytes=1 << 30)
    t0 = time.time() - 100
    for offset in (0, 10, 20):
        sink.write([PredictionRecord(iso_time(t0 + offset), MODEL, "/predict", f"r{offset}", None, None, None, *ROW, 0.5, True)])  # fmt: skip
    sink.close()
    (path,) = tmp_path.glob("predictions-*.jsonl")
    with open(path, "ab") as fh:
        fh.write(b'{"time":"2026-')  # a writer caught mid-line
    window = [r.request_id for batch in read_files(tmp_path, since=t0 + 5, until=t0 + 15) for r in batch]
    assert window == ["r10"]
    assert len(read_all(tmp_path)) == 3


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"abc-123", True),
        (b"7f9c2ba4e88f827d616045507605853e", True),
        (b"with inner spaces", True),
        (b"a" * 128, True),
        (b"a" * 129, False),
        (b"", False),
        (b" padded", False),
        (b"bell\x07", False),
        (b"new\nline", False),
        ("caf\u00e9".encode("latin-1"), False),
    ],
    ids=["short", "hex", "spaces", "128", "129", "empty", "leading-space", "control", "newline", "non-ascii"],
)
def test_a_well_formed_client_request_id_is_kept_else_replaced(sent, kept):
    got = requestid.from_scope({"headers": [(b"content-type", b"application/json"), (requestid.HEADER, sent)]})
    if kept:
        assert got == sent.decode()
    else:
        assert got != sent.decode("latin-1") and len(got) == 32 and int(got, 16) >= 0


def test_generated_request_ids_differ():
    ids = {requestid.from_scope({"headers": []}) for _ in range(1000)}
    assert len(ids) == 1000


def test_integral_floats_read_as_integers_and_bad_lines_are_skipped(tmp_path):
    (tmp_path / "predictions-1-x-1.jsonl").write_text(
        '{"time":"2026-12-02T07:10:02.114Z","model_version":"m","route":"/predict","Age":42.0,"Tenure":2}\n'
        '{"time":"2026-12-02T07:10:02.115Z","model_version":"m","route":"/predict","Age":42.5}\n'
    )
    (record,) = read_all(tmp_path)
    assert record.Age == 42 and type(record.Age) is int
