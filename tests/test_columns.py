"""Columnar validation (models.columns.validate_columns): the same rules and wording as /predict's
request model, vectorised, with every error located by row and feature."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.columns import FEW_ROWS, validate_columns
from models.schema import (
    BY_NAME,
    CATEGORICAL_FEATURES,
    EXAMPLE_CUSTOMER,
    FEATURE_NAMES,
    NUMERIC_FEATURES,
    Customer,
)
from serving.edge import describe_validation_errors


def columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as columns, as validate_columns takes them: float64 numbers, object arrays of strings."""
    out = {name: np.array([r[name] for r in rows], dtype=np.float64) for name in NUMERIC_FEATURES}
    for name in CATEGORICAL_FEATURES:
        out[name] = np.empty(len(rows), dtype=object)  # filled one by one: a list value stays one value
        out[name][:] = [r[name] for r in rows]
    return out


def predict_says(name: str, value) -> str:
    """/predict's message for one bad value, without the 'customer.<name>: ' prefix."""
    with pytest.raises(pydantic.ValidationError) as info:
        Customer.model_validate({**EXAMPLE_CUSTOMER, name: value})
    (message,) = describe_validation_errors(info.value.errors())
    return message.removeprefix(f"{name}: ")


# (feature, value): every bound of every numeric feature, non-finite numbers, unknown categories
WORDED_AS_PREDICT = [
    *[(n, BY_NAME[n].minimum - 1) for n in NUMERIC_FEATURES if BY_NAME[n].kind != "flag"],
    *[(n, BY_NAME[n].maximum + 1) for n in NUMERIC_FEATURES if BY_NAME[n].kind != "flag"],
    ("HasCrCard", -1),
    ("IsActiveMember", 2),
    ("Balance", math.nan),
    ("EstimatedSalary", math.inf),
    ("Balance", -math.inf),
    ("Geography", "Italy"),
    ("Gender", "male"),
    ("Geography", ""),
]


@pytest.mark.parametrize(("name", "value"), WORDED_AS_PREDICT, ids=[f"{n}={v!r}" for n, v in WORDED_AS_PREDICT])
def test_a_bad_value_is_worded_as_predict_words_it(name, value):
    checked = validate_columns(columns([EXAMPLE_CUSTOMER, {**EXAMPLE_CUSTOMER, name: value}]))
    assert checked.errors == [(1, name, predict_says(name, value))]
    assert checked.valid.tolist() == [True, False]


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        (
            "Age",
            42.5,
            "Input should be a valid integer, got a number with a fractional part (allowed: an integer in [18, 100])",
        ),
        ("HasCrCard", 0.5, "Input should be a valid integer, got a number with a fractional part (allowed: 0 or 1)"),
        ("Tenure", math.nan, "Input should be a finite number (allowed: an integer in [0, 60])"),
        ("CreditScore", -math.inf, "Input should be a finite number (allowed: an integer in [300, 900])"),
        ("Age", 1e300, "Input should be less than or equal to 100 (allowed: an integer in [18, 100])"),
        ("Gender", None, "Input should be 'Female' or 'Male' (allowed: one of 'Female', 'Male')"),
        ("Gender", 1, "Input should be 'Female' or 'Male' (allowed: one of 'Female', 'Male')"),
        (
            "Geography",
            ["France"],
            "Input should be 'France', 'Germany' or 'Spain' (allowed: one of 'France', 'Germany', 'Spain')",
        ),
        (
            "Geography",
            "France\x00",
            "Input should be 'France', 'Germany' or 'Spain' (allowed: one of 'France', 'Germany', 'Spain')",
        ),
    ],
)
def test_what_json_cannot_say_to_predict(name, value, says):
    """Values only columns carry: floats for integer features (integral ones are fine), NaN and
    infinities, anything in a category array. pydantic's own words where it has some."""
    checked = validate_columns(columns([{**EXAMPLE_CUSTOMER, name: value}]))
    assert checked.errors == [(0, name, says)]


def test_integral_floats_are_integers():
    checked = validate_columns(columns([{**EXAMPLE_CUSTOMER, "Age": 42.0, "HasCrCard": 0.0, "Tenure": 0.0}]))
    assert checked.errors == [] and checked.valid.tolist() == [True]


def test_errors_come_in_row_then_schema_order_one_per_value():
    rows = [dict(EXAMPLE_CUSTOMER) for _ in range(5)]
    rows[3].update(EstimatedSalary=-1.0, Geography="Italy", CreditScore=math.nan)
    rows[1].update(IsActiveMember=7, Age=10.5)
    checked = validate_columns(columns(rows))
    assert [(row, name) for row, name, _ in checked.errors] == [
        (1, "Age"),
        (1, "IsActiveMember"),
        (3, "CreditScore"),
        (3, "Geography"),
        (3, "EstimatedSalary"),
    ]
    assert checked.valid.tolist() == [True, False, True, False, True]
    assert "finite number" in checked.errors[2][2]  # NaN: finite is checked first, not the bounds
    assert "fractional part" in checked.errors[0][2]  # 10.5: the integer check before the minimum


def test_the_checked_columns_are_in_schema_order_and_extra_columns_are_ignored():
    rows = [EXAMPLE_CUSTOMER, {**EXAMPLE_CUSTOMER, "Age": 60, "Geography": "Spain"}]
    checked = validate_columns({**columns(rows), "Surname": np.array(["Hargrave", "Hill"], dtype=object)})
    assert checked.numeric.dtype == np.float64 and checked.numeric.shape == (2, len(NUMERIC_FEATURES))
    assert checked.numeric[1].tolist() == [float(rows[1][n]) for n in NUMERIC_FEATURES]
    assert sorted(checked.categorical) == sorted(CATEGORICAL_FEATURES)
    assert checked.categorical["Geography"].tolist() == ["France", "Spain"]
    assert len(checked) == 2 and checked.errors == []


def test_missing_columns_and_ragged_columns_are_the_callers_mistake():
    full = columns([EXAMPLE_CUSTOMER])
    with pytest.raises(ValueError, match="missing column"):
        validate_columns({k: v for k, v in full.items() if k != "Age"})
    with pytest.raises(ValueError, match="arrays"):
        validate_columns({**full, "Age": np.array([42.0, 43.0])})
    with pytest.raises(ValueError, match="arrays"):
        validate_columns({**full, "Gender": np.array([["Male"]], dtype=object)})


def test_a_large_batch_of_bad_rows_reports_every_value():
    n = 10_000
    rows = columns([EXAMPLE_CUSTOMER] * n)
    rows["Age"] = np.full(n, 150.0)
    rows["Gender"] = np.array(["?"] * n, dtype=object)
    checked = validate_columns(rows)
    assert len(checked.errors) == 2 * n and not checked.valid.any()
    assert checked.errors[:2] == [(0, "Gender", checked.errors[0][2]), (0, "Age", checked.errors[1][2])]


# ----------------------------------------------------------------------------- against /predict's model

_VALUES = {
    "int": st.one_of(st.integers(-5, 1200), st.sampled_from([math.nan, math.inf, 42.5])),
    "flag": st.one_of(st.integers(-2, 3), st.just(0.5)),
    "float": st.one_of(st.floats(-10, 2e7), st.sampled_from([math.nan, -math.inf])),
    "category": None,
}


def _value(name: str):
    feature = BY_NAME[name]
    if feature.kind == "category":
        return st.sampled_from([*feature.categories, "Italy", "", "female"])
    return _VALUES[feature.kind]


ROW = st.fixed_dictionaries({name: _value(name) for name in FEATURE_NAMES})


def _predict_errors(row: dict) -> set[str]:
    """The features /predict refuses in this row (floats for integer features are given as
    integers when integral, as a JSON client would write them)."""
    body = {
        n: int(v) if BY_NAME[n].kind in ("int", "flag") and isinstance(v, float) and v.is_integer() else v
        for n, v in row.items()
    }
    try:
        Customer.model_validate(body)
    except pydantic.ValidationError as exc:
        return {e["loc"][0] for e in exc.errors()}
    return set()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(ROW, min_size=1, max_size=FEW_ROWS))
def test_the_same_rows_are_refused_as_by_predicts_model_on_both_paths(rows):
    """A few rows are checked value by value, more with NumPy: both as /predict's model does."""
    few = validate_columns(columns(rows))
    for i, row in enumerate(rows):
        assert {name for r, name, _ in few.errors if r == i} == _predict_errors(row), row
        assert few.valid[i] == (not _predict_errors(row))
    copies = FEW_ROWS // len(rows) + 1  # enough rows for the vectorised path
    many = validate_columns(columns(rows * copies))
    n = len(rows)
    assert many.errors == [(row + k * n, name, msg) for k in range(copies) for row, name, msg in few.errors]
    assert many.valid.tolist() == few.valid.tolist() * copies
    np.testing.assert_array_equal(many.numeric[:n], few.numeric)
    for name in CATEGORICAL_FEATURES:
        assert many.categorical[name][:n].tolist() == few.categorical[name].tolist()


def test_plain_lists_are_columns_too():
    rows = [EXAMPLE_CUSTOMER, {**EXAMPLE_CUSTOMER, "Age": 12}]
    as_lists = validate_columns({name: [r[name] for r in rows] for name in FEATURE_NAMES})
    as_arrays = validate_columns(columns(rows))
    assert as_lists.errors == as_arrays.errors == [(1, "Age", predict_says("Age", 12))]
    np.testing.assert_array_equal(as_lists.numeric, as_arrays.numeric)
    assert as_lists.numeric.dtype == np.float64
