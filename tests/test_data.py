"""Training-data validation: every kind of bad data gives its own clear error."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from harness.servers import ROOT
from models.schema import DataValidationError, validate_frame
from training.data import DEFAULT_DATA, load_data


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return pd.read_csv(DEFAULT_DATA).head(300)


def _set(col, rows, value):
    def mutate(df):
        df[col] = df[col].astype(object)
        df.loc[df.index[rows], col] = value
        return df

    return mutate


BAD_DATA = [
    # (mutation, message pattern)
    (
        lambda df: df.drop(columns=["Balance", "Age"]),
        r"missing column\(s\): Age, Balance|missing column\(s\): Balance, Age",
    ),
    (_set("Age", [3, 4], "forty"), r"column 'Age': expected numbers, 2 rows are not numeric"),
    (_set("CreditScore", [1, 2, 5], np.nan), r"column 'CreditScore': 3 rows are null"),
    (_set("Balance", [7], -10.0), r"column 'Balance': 1 rows are not a number in \[0, 1e\+07\]"),
    (_set("Age", [0, 9], 150), r"column 'Age': 2 rows are not an integer in \[18, 100\]"),
    (_set("Age", [0], 30.5), r"column 'Age': 1 rows are not an integer"),
    (
        _set("Geography", [2, 3], "Italy"),
        r"column 'Geography': 2 rows have a value outside one of 'France'.*found Italy",
    ),
    (_set("HasCrCard", [4], 2), r"column 'HasCrCard': 1 rows are not 0 or 1"),
    (_set("Exited", [1], 2), r"column 'Exited': 1 rows are not 0 or 1"),
    (lambda df: df.assign(Exited=0), r"column 'Exited': only one class present"),
    (_set("CustomerId", [5, 6], 15634602), r"column 'CustomerId': 2 rows repeat a customer id"),
    (_set("EstimatedSalary", [1], np.inf), r"column 'EstimatedSalary': 1 rows are not a number"),
    (lambda df: df.iloc[0:0], r"the dataset has no rows"),
]


@pytest.mark.parametrize(("mutate", "message"), BAD_DATA)
def test_bad_data_is_refused_with_a_clear_message(raw, mutate, message):
    with pytest.raises(DataValidationError, match=message):
        validate_frame(mutate(raw.copy()))


def test_several_problems_are_all_reported(raw):
    df = _set("Age", [0], 150)(_set("Geography", [1], "Mars")(raw.copy()))
    with pytest.raises(DataValidationError) as err:
        validate_frame(df)
    assert len(err.value.problems) == 2


def test_identifiers_are_never_features(raw):
    out = validate_frame(raw)
    assert not {"RowNumber", "CustomerId", "Surname"} & set(out.columns)
    assert len(out) == len(raw)  # nothing dropped


def test_real_dataset_is_valid():
    df = load_data()
    assert len(df) == 10_000
    assert df["Exited"].sum() == 2037


def test_cli_exits_non_zero_with_one_line_reason(tmp_path, raw):
    bad = raw.copy()
    bad.loc[bad.index[0], "Balance"] = -5
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    proc = subprocess.run(
        [sys.executable, "-m", "training", "--data", str(path), "--fast", "--no-compile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "column 'Balance'" in err_lines[0]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataValidationError, match="data file not found"):
        load_data(tmp_path / "nope.csv")
