"""The monitoring jobs' own logic in-process: time windows, joining outcomes to logged
predictions, and when a realized metric counts as below its estimate."""

from __future__ import annotations

import pandas as pd
import pytest

from monitoring.logged import parse_when
from monitoring.performance import CannotJudge, evaluate, match, read_outcomes

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", NOW - 86400),
        ("30m", NOW - 1800),
        ("7d", NOW - 7 * 86400),
        ("2w", NOW - 14 * 86400),
        ("1.5h", NOW - 5400),
        ("2027-01-15T00:00:00Z", NOW - 8 * 3600),
        ("2027-01-15T01:00:00+01:00", NOW - 8 * 3600),
        ("2027-01-15", NOW - 8 * 3600),
    ],
)
def test_windows_are_durations_ago_or_iso_times(text, expected):
    assert parse_when(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["yesterday", "24", "-3h", "3 days"])
def test_other_windows_are_refused_naming_the_forms(text):
    with pytest.raises(ValueError, match=r"duration .* ISO 8601"):
        parse_when(text, NOW)


def logged(*rows) -> pd.DataFrame:
    columns = ("time", "model_version", "request_id", "job_id", "row", "CustomerId", "churn_probability", "will_churn")
    return pd.DataFrame([dict(zip(columns, r, strict=True)) for r in rows])


LOG = logged(
    ("2027-01-01T00:00:00.000Z", "m:1", "r1", None, None, None, 0.1, False),  # a /predict call
    ("2027-01-01T00:00:01.000Z", "m:1", "b1", None, 1, None, 0.2, False),  # a /predict_batch of two
    ("2027-01-01T00:00:01.000Z", "m:1", "b1", None, 2, None, 0.3, True),
    ("2027-01-02T00:00:00.000Z", "m:1", None, "job", 1, "c1", 0.4, True),  # c1 scored twice
    ("2027-02-02T00:00:00.000Z", "m:1", None, "job2", 1, "c1", 0.5, True),
)


@pytest.mark.parametrize(
    ("outcome", "probability"),
    [
        ({"request_id": "r1"}, 0.1),
        ({"request_id": "b1", "row": "2"}, 0.3),
        ({"request_id": "b1"}, "ambiguous"),  # two rows under one id, no row given
        ({"request_id": "nope"}, "unmatched"),
        ({"CustomerId": "c1", "date": "2027-01-15"}, 0.4),  # the latest prediction before the outcome
        ({"CustomerId": "c1", "date": "2027-03-01"}, 0.5),
        ({"CustomerId": "c1"}, 0.5),
        ({"CustomerId": "c1", "date": "2026-12-31"}, "unmatched"),  # no prediction before it
        ({"CustomerId": "c2"}, "unmatched"),
    ],
)
def test_an_outcome_settles_the_prediction_it_names(tmp_path, outcome, probability):
    path = tmp_path / "outcomes.csv"
    pd.DataFrame([{"Exited": 1, **outcome}]).to_csv(path, index=False)
    matched, counts = match(read_outcomes(path), LOG)
    if isinstance(probability, float):
        assert matched["churn_probability"].tolist() == [probability]
    else:
        assert matched.empty and counts[probability] == 1


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("CustomerId,churned\n1,1\n", "no Exited column"),
        ("Exited,date\n1,2027-01-01\n", "needs a CustomerId or a request_id"),
        ("CustomerId,Exited\n1,yes\n", "other than 0 or 1"),
        ("CustomerId,Exited,date\n1,1,last week\n", "ISO 8601"),
    ],
)
def test_a_bad_outcomes_file_is_refused_naming_the_problem(tmp_path, csv, message):
    path = tmp_path / "outcomes.csv"
    path.write_text(csv)
    with pytest.raises(CannotJudge, match=message):
        read_outcomes(path)


METADATA = {
    "cross_validation": {
        "roc_auc": {"stack": {"mean": 0.86, "std": 0.01}},
        "pr_auc": {"stack": {"mean": 0.70, "std": 0.02}},
        "brier": {"stack": {"mean": 0.10, "std": 0.004}},
        "scheme": {"rows": 8000, "folds": 5},
    },
    "decision": {"offer_cost": 100.0, "customer_value": 500.0, "expected_value_per_customer": 45.0},
}


def scored(n_each: int, separation: float) -> pd.DataFrame:
    """Churners at p = 0.5 + separation/2 and stayers at 0.5 - separation/2, half each, overlapping."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.repeat([1, 0], n_each)
    p = np.clip(0.5 + (y - 0.5) * separation + rng.normal(0, 0.15, len(y)), 0.01, 0.99)
    return pd.DataFrame({"Exited": y, "churn_probability": p, "will_churn": p >= 0.2})


def test_a_metric_is_below_its_estimate_only_when_it_falls_by_more_than_the_tolerance():
    good = evaluate(scored(2000, 0.35), METADATA)["metrics"]
    assert good["roc_auc"]["realized"] > 0.9 and good["roc_auc"]["below_estimate"] is False
    bad = evaluate(scored(2000, 0.05), METADATA)["metrics"]
    assert bad["roc_auc"]["realized"] < 0.7 and bad["roc_auc"]["below_estimate"] is True
    assert bad["brier"]["below_estimate"] is True, "Brier: lower is better, so above the estimate is worse"
    small = evaluate(scored(50, 0.35), METADATA)["metrics"]["roc_auc"]
    assert small["tolerance"] == pytest.approx(2 * 0.01 * (1600 / 100) ** 0.5), "fewer rows than a fold: wider"
    assert bad["expected_value_per_customer"]["test_split"] == 45.0


def test_keep_prunes_only_the_oldest_report_directories(tmp_path):
    import os

    from monitoring.drift import prune

    for i in range(5):
        report = tmp_path / f"2027-01-0{i + 1}"
        report.mkdir()
        (report / "drift.json").write_text("{}")
        os.utime(report, (1_800_000_000 + i, 1_800_000_000 + i))
    (tmp_path / "notes").mkdir()  # not a report: never touched
    deleted = prune(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["2027-01-01", "2027-01-02", "2027-01-03"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2027-01-04", "2027-01-05", "notes"]
