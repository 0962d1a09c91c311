"""The monitoring jobs end to end: real traffic made from the dataset goes through a real
`bentoml serve`, which logs it; `python -m monitoring.drift` and `python -m monitoring.performance`
run as the commands they are and read the log with the service's settings.

- No false alarm: the held-out test split, sent as traffic, flags no feature.
- Drift is found where it is: the same customers with Age + 10 years and 70% of them in
  Germany flag Age, Geography and the prediction, and nothing else.
- Realized performance on the test split's outcomes equals the training report's test metrics.
- The figures reach a real Pushgateway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pandas as pd
import pytest

from harness.data import DATA, drifted, submit_job
from harness.fleet import wait_for_job
from harness.pushgateway import Pushgateway
from harness.servers import ROOT, metric, serving
from models.schema import FEATURE_NAMES, ID_COLUMN, TARGET, json_customer
from serving.predictionlog.sinks import iso_time as iso
from serving.predictionlog.sinks import read_files

pytestmark = pytest.mark.integration  # a real `bentoml serve`, the CLIs as subprocesses, a Pushgateway


def logged_rows(directory) -> int:
    return sum(len(batch) for batch in read_files(directory, since=0))


def wait_logged(directory, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while logged_rows(directory) < n:
        assert time.monotonic() < deadline, f"{logged_rows(directory)} of {n} rows logged"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def traffic(trained, tmp_path_factory):
    """One server, two windows of logged traffic: the test split as it is (sent as a scoring
    job, CustomerIds included), then the drifted test split (through /predict_batch, V2 and
    single /predict calls)."""
    log_dir = tmp_path_factory.mktemp("log")
    env = {"BANKCHURN_MODEL_TAG": str(trained.model.tag), "BANKCHURN_PREDICTION_LOG_DIR": str(log_dir)}
    test = trained.splits.test
    ids = pd.read_csv(DATA, usecols=[ID_COLUMN])[ID_COLUMN].to_numpy()[test.index]
    with serving(env=env) as server:
        start = time.time()
        upload = test[list(FEATURE_NAMES)].assign(**{ID_COLUMN: ids}).to_csv(index=False).encode()
        job = submit_job(server.url, upload).json()
        wait_for_job(server.url, job["job_id"])
        wait_logged(log_dir, len(test))
        time.sleep(0.01)
        middle = time.time()
        shifted = [json_customer(r) for r in drifted(test).to_dict(orient="records")]
        for i in range(0, 1900, 950):
            r = httpx.post(f"{server.url}/predict_batch", json={"customers": shifted[i : i + 950]}, timeout=60)
            assert r.status_code == 200, r.text[:300]
        for customer in shifted[1900:]:
            assert httpx.post(f"{server.url}/predict", json={"customer": customer}).status_code == 200
        wait_logged(log_dir, 2 * len(test))
        end = time.time() + 0.01
        written = metric(httpx.get(f"{server.url}/metrics").text, "bank_churn_prediction_log_written_rows_total")
    assert written == 2 * len(test)
    outcomes = pd.DataFrame({ID_COLUMN: ids, TARGET: test[TARGET].to_numpy(), "date": iso(end + 86400)})
    return {"env": env, "windows": (start, middle, end), "outcomes": outcomes, "rows": len(test)}


def run_cli(module: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def no_drift(traffic, tmp_path_factory):
    start, middle, _ = traffic["windows"]
    out = tmp_path_factory.mktemp("no-drift")
    proc = run_cli("monitoring.drift", traffic["env"], "--since", iso(start), "--until", iso(middle), "--out", str(out))
    return proc, out


@pytest.fixture(scope="module")
def with_drift(traffic, tmp_path_factory):
    pushgateway = Pushgateway(tmp_path_factory.mktemp("pushgateway")).start()
    _, middle, end = traffic["windows"]
    out = tmp_path_factory.mktemp("drift")
    args = ("--since", iso(middle), "--until", iso(end + 1), "--out", str(out), "--pushgateway", pushgateway.url)
    proc = run_cli("monitoring.drift", traffic["env"], *args)
    yield proc, out, pushgateway.metrics()
    pushgateway.stop()


def test_no_false_alarm_on_the_held_out_test_split(no_drift, traffic, trained):
    proc, out = no_drift
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "drift.json").read_text())
    assert report["drifted_features"] == [] and report["share_drifted"] == 0
    assert report["prediction_drift"] is False and report["drift"] is False
    assert report["rows_current"] == traffic["rows"]
    assert report["rows_reference"] == len(trained.splits.train)
    assert report["model_version"] == str(trained.model.tag)
    assert (out / "drift.html").stat().st_size > 10_000


def test_drift_is_found_where_it_is(with_drift, traffic):
    proc, out, _ = with_drift
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / "drift.json").read_text())
    assert report["drifted_features"] == ["Geography", "Age"], report["features"]
    assert report["share_drifted"] == 0.2
    assert report["prediction_drift"] is True
    assert report["rows_current"] == traffic["rows"]
    methods = {name: f["method"] for name, f in report["features"].items()}
    assert methods["Age"] == "Wasserstein distance (normed)" and methods["Geography"] == "Jensen-Shannon distance"
    assert "DRIFT" in proc.stdout and "drifted features: Geography, Age" in proc.stdout


def test_drift_figures_reach_the_pushgateway(with_drift, trained):
    _, _, text = with_drift
    tag = str(trained.model.tag)
    for feature in FEATURE_NAMES:
        drifted_now = 1 if feature in ("Age", "Geography") else 0
        assert metric(text, "bank_churn_drift_detected", feature=feature, model_version=tag) == drifted_now
        assert metric(text, "bank_churn_drift_score", feature=feature, job="bank_churn_drift") >= 0
    assert metric(text, "bank_churn_drift_prediction_detected", model_version=tag) == 1
    assert metric(text, "bank_churn_drift_share_drifted") == 0.2
    assert metric(text, "bank_churn_drift_detected_overall") == 1
    assert abs(metric(text, "bank_churn_drift_last_success_timestamp_seconds") - time.time()) < 600


def test_realized_performance_on_the_test_split_equals_the_training_report(traffic, trained, tmp_path):
    start, middle, _ = traffic["windows"]
    outcomes = tmp_path / "outcomes.csv"
    traffic["outcomes"].to_csv(outcomes, index=False)
    args = ("--outcomes", str(outcomes), "--since", iso(start), "--until", iso(middle), "--out", str(tmp_path / "out"))
    proc = run_cli("monitoring.performance", traffic["env"], *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "performance.json").read_text())
    assert report["rows_matched"] == traffic["rows"] and report["rows_unmatched"] == 0
    test_metrics = trained.report["metrics"]
    for name in ("roc_auc", "pr_auc", "brier"):
        assert report[name] == pytest.approx(test_metrics[name], abs=1e-12), name
        assert report["metrics"][name]["below_estimate"] is False
    decision = trained.report["decision"]
    assert report["metrics"]["expected_value_per_customer"]["realized"] == pytest.approx(
        decision["expected_value_per_customer"]
    )
    assert "Realized performance" in (tmp_path / "out" / "performance.html").read_text()


def test_a_window_without_traffic_cannot_be_judged(traffic, tmp_path):
    start, _, _ = traffic["windows"]
    proc = run_cli("monitoring.drift", traffic["env"], "--since", iso(start - 7200), "--until", iso(start - 3600), "--out", str(tmp_path))  # fmt: skip
    assert proc.returncode == 2 and "no logged predictions" in proc.stderr
    assert "error" in json.loads((tmp_path / "drift.json").read_text())
