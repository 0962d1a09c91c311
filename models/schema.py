"""The customer feature schema: defined once, used everywhere.

Training validates the CSV against it, the service builds its request model from it and
checks that the served model was trained with the same schema, and the tests and load
tests draw their payloads from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pydantic

if TYPE_CHECKING:  # training-side checks take DataFrames; serving never imports pandas
    import pandas as pd

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Feature:
    """One input column: its type and what values are allowed."""

    name: str
    kind: Literal["int", "float", "flag", "category"]
    description: str
    minimum: float | None = None
    maximum: float | None = None
    categories: tuple[str, ...] = field(default_factory=tuple)

    def allowed(self) -> str:
        """Human-readable description of the allowed values (used in error messages)."""
        if self.kind == "category":
            return "one of " + ", ".join(repr(c) for c in self.categories)
        if self.kind == "flag":
            return "0 or 1"
        noun = "an integer" if self.kind == "int" else "a number"
        return f"{noun} in [{self.minimum:g}, {self.maximum:g}]"


# Ranges are "sane for a retail bank customer", wider than the training data
# (CreditScore 350-850, Age 18-92, Tenure 0-10, NumOfProducts 1-4) so real customers are
# not refused, but narrow enough to reject typos and garbage.
FEATURES: tuple[Feature, ...] = (
    Feature("CreditScore", "int", "Credit score", 300, 900),
    Feature("Geography", "category", "Country", categories=("France", "Germany", "Spain")),
    Feature("Gender", "category", "Gender", categories=("Female", "Male")),
    Feature("Age", "int", "Age in years", 18, 100),
    Feature("Tenure", "int", "Years as a customer", 0, 60),
    Feature("Balance", "float", "Account balance", 0, 10_000_000),
    Feature("NumOfProducts", "int", "Number of bank products held", 1, 10),
    Feature("HasCrCard", "flag", "Has a credit card (1) or not (0)"),
    Feature("IsActiveMember", "flag", "Active member (1) or not (0)"),
    Feature("EstimatedSalary", "float", "Estimated yearly salary", 0, 10_000_000),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}
NUMERIC_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.kind != "category")
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.kind == "category")
TARGET = "Exited"
ID_COLUMN = "CustomerId"
# Identifiers: present in the CSV, never features.
IDENTIFIER_COLUMNS: tuple[str, ...] = ("RowNumber", "CustomerId", "Surname")

EXAMPLE_CUSTOMER: dict[str, Any] = {
    "CreditScore": 619,
    "Geography": "France",
    "Gender": "Female",
    "Age": 42,
    "Tenure": 2,
    "Balance": 0.0,
    "NumOfProducts": 1,
    "HasCrCard": 1,
    "IsActiveMember": 1,
    "EstimatedSalary": 101348.88,
}


def schema_dict() -> dict[str, Any]:
    """The schema as plain JSON data: stored in the model's metadata, shown on the card."""
    return {
        "version": SCHEMA_VERSION,
        "target": TARGET,
        "features": [
            # Unset bounds/categories are left out: the model store's metadata takes no None.
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(f).items() if v not in (None, ())}
            for f in FEATURES
        ],
    }


# ---------------------------------------------------------------- training data checks


class DataValidationError(ValueError):
    """The dataset does not match the schema. The message names each bad column."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _rows_hint(mask: pd.Series) -> str:
    rows = [str(i) for i in mask[mask].index[:3]]
    return f" (e.g. data row {', '.join(rows)})" if rows else ""


def validate_frame(df: pd.DataFrame, *, require_target: bool = True) -> pd.DataFrame:
    """Check a raw dataset against the schema; return the feature columns plus target.

    Raises DataValidationError naming every bad column and how many rows are bad. Nothing
    is dropped or coerced silently. Row numbers in messages count data rows from 0.
    """
    import pandas as pd

    problems: list[str] = []
    required = list(FEATURE_NAMES) + ([TARGET] if require_target else [])
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataValidationError([f"missing column(s): {', '.join(missing)}"])
    if df.empty:
        raise DataValidationError(["the dataset has no rows"])
    df = df.reset_index(drop=True)

    for feat in FEATURES:
        col = df[feat.name]
        nulls = col.isna()
        if nulls.any():
            problems.append(f"column '{feat.name}': {int(nulls.sum())} rows are null{_rows_hint(nulls)}")
            continue
        if feat.kind == "category":
            bad = ~col.isin(feat.categories)
            if bad.any():
                seen = sorted({str(v) for v in col[bad].unique()[:5]})
                problems.append(
                    f"column '{feat.name}': {int(bad.sum())} rows have a value outside "
                    f"{feat.allowed()} (found {', '.join(seen)}){_rows_hint(bad)}"
                )
            continue
        if pd.api.types.is_bool_dtype(col):
            problems.append(f"column '{feat.name}': expected numbers, found booleans")
            continue
        values = pd.to_numeric(col, errors="coerce").astype("float64")
        not_numeric = values.isna()
        if not_numeric.any():
            problems.append(
                f"column '{feat.name}': expected numbers, {int(not_numeric.sum())} rows are not "
                f"numeric{_rows_hint(not_numeric)}"
            )
            continue
        bad = ~np.isfinite(values)
        if feat.kind in ("int", "flag"):
            bad |= values != np.floor(values)
        lo, hi = (0, 1) if feat.kind == "flag" else (feat.minimum, feat.maximum)
        bad |= (values < lo) | (values > hi)
        if bad.any():
            problems.append(f"column '{feat.name}': {int(bad.sum())} rows are not {feat.allowed()}{_rows_hint(bad)}")

    if require_target:
        target = df[TARGET]
        bad = ~target.isin([0, 1]) | target.isna()
        if bad.any():
            problems.append(f"column '{TARGET}': {int(bad.sum())} rows are not 0 or 1{_rows_hint(bad)}")
        elif target.nunique() < 2:
            problems.append(f"column '{TARGET}': only one class present, need both 0 and 1")
    if ID_COLUMN in df.columns:
        dup = df[ID_COLUMN].duplicated(keep="first")
        if dup.any():
            problems.append(f"column '{ID_COLUMN}': {int(dup.sum())} rows repeat a customer id{_rows_hint(dup)}")

    if problems:
        raise DataValidationError(problems)
    out = df[list(FEATURE_NAMES)].copy()
    for feat in FEATURES:
        if feat.kind == "category":
            out[feat.name] = out[feat.name].astype(str)
        else:
            out[feat.name] = out[feat.name].astype("float64")
    if require_target:
        out[TARGET] = df[TARGET].astype("int64")
    return out


def frame_from_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Feature frame (schema column order and dtypes) from already-validated rows."""
    import pandas as pd

    frame = pd.DataFrame.from_records(rows, columns=list(FEATURE_NAMES))
    for name in NUMERIC_FEATURES:
        frame[name] = frame[name].astype("float64")
    return frame


# ---------------------------------------------------------------- request model


def _field_for(feat: Feature) -> tuple[Any, Any]:
    common = {"description": f"{feat.description}: {feat.allowed()}", "examples": [EXAMPLE_CUSTOMER[feat.name]]}
    if feat.kind == "category":
        return Literal[feat.categories], pydantic.Field(..., **common)  # type: ignore[valid-type]
    if feat.kind in ("int", "flag"):
        lo, hi = (0, 1) if feat.kind == "flag" else (int(feat.minimum), int(feat.maximum))
        return int, pydantic.Field(..., strict=True, ge=lo, le=hi, **common)
    return float, pydantic.Field(..., strict=True, ge=feat.minimum, le=feat.maximum, allow_inf_nan=False, **common)


def _build_customer_model() -> type[pydantic.BaseModel]:
    fields = {f.name: _field_for(f) for f in FEATURES}
    config = pydantic.ConfigDict(
        extra="forbid",
        # BentoML 1.4 OpenAPI components take the singular OpenAPI 3.0 `example`.
        json_schema_extra={"example": EXAMPLE_CUSTOMER},
    )
    return pydantic.create_model(
        "Customer",
        __config__=config,
        __doc__="One bank customer; field names are the dataset's columns.",
        **fields,
    )


# Strict types: numbers must be JSON numbers (not strings), integer fields integers, flags 0/1;
# unknown fields are refused so a typo ("Ages") is not silently ignored.
Customer = _build_customer_model()


_CUSTOMERS = pydantic.TypeAdapter(list[Customer])


class BatchValidationError(ValueError):
    """Some rows of a batch are invalid; `errors` are pydantic-style dicts with full paths."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.errors = errors
        super().__init__(f"{len(errors)} invalid field(s)")


def validate_rows(records: list[Any], prefix: str = "") -> list[tuple]:
    """Validate raw records against Customer; return rows in FEATURE_NAMES order."""
    try:
        customers = _CUSTOMERS.validate_python(records)
    except pydantic.ValidationError as exc:
        head = [prefix] if prefix else []
        errors = [
            {"type": e["type"], "loc": [*head, *e["loc"]], "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        raise BatchValidationError(errors) from None
    return [row_values(c) for c in customers]


def json_customer(row: dict[str, Any]) -> dict[str, Any]:
    """A dataset row as a client sends it: integers as int, amounts as float, categories as str."""
    out = {}
    for name in FEATURE_NAMES:
        kind, value = BY_NAME[name].kind, row[name]
        out[name] = str(value) if kind == "category" else int(value) if kind in ("int", "flag") else float(value)
    return out


def row_values(customer: pydantic.BaseModel | dict[str, Any]) -> tuple[Any, ...]:
    """A validated customer as a tuple in FEATURE_NAMES order (the predictor's row format)."""
    data = customer if isinstance(customer, dict) else customer.__dict__
    return tuple(data[name] for name in FEATURE_NAMES)


# ---------------------------------------------------------------- columnar validation


@dataclass(frozen=True)
class ValidatedColumns:
    """Columns checked against the schema (see validate_columns)."""

    numeric: np.ndarray  # float64 [n, len(NUMERIC_FEATURES)], columns in NUMERIC_FEATURES order
    categorical: dict[str, np.ndarray]  # one object array [n] per CATEGORICAL_FEATURES name
    errors: list[tuple[int, str, str]]  # (row, feature, message): row order, then schema order
    valid: np.ndarray  # bool [n]: rows without an error

    def __len__(self) -> int:
        return len(self.valid)


def _bound(value: float) -> str:
    """A bound as pydantic prints it in its messages (300, 0, 10000000, 0.5)."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def _literal(categories: tuple[str, ...]) -> str:
    quoted = [repr(c) for c in categories]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _numeric_messages(feat: Feature) -> tuple[str, ...]:
    """The message of each check of a numeric value (finite, integer, minimum, maximum), in the
    order they are tried: the first that fails is the value's one error. The wording is
    pydantic's (what /predict says), plus the allowed values."""
    lo, hi = (0, 1) if feat.kind == "flag" else (feat.minimum, feat.maximum)
    allowed = f" (allowed: {feat.allowed()})"
    return (
        "Input should be a finite number" + allowed,
        "Input should be a valid integer, got a number with a fractional part" + allowed,
        f"Input should be greater than or equal to {_bound(lo)}" + allowed,
        f"Input should be less than or equal to {_bound(hi)}" + allowed,
    )


_NUMERIC = tuple(BY_NAME[n] for n in NUMERIC_FEATURES)
_NUMERIC_MESSAGES = tuple(_numeric_messages(f) for f in _NUMERIC)
_LOWER = np.array([0 if f.kind == "flag" else f.minimum for f in _NUMERIC], dtype=np.float64)
_UPPER = np.array([1 if f.kind == "flag" else f.maximum for f in _NUMERIC], dtype=np.float64)
_INTEGRAL = np.array([f.kind in ("int", "flag") for f in _NUMERIC])
_CATEGORY_MESSAGES = {
    n: f"Input should be {_literal(BY_NAME[n].categories)} (allowed: {BY_NAME[n].allowed()})"
    for n in CATEGORICAL_FEATURES
}
_CATEGORY_SETS = {n: frozenset(BY_NAME[n].categories) for n in CATEGORICAL_FEATURES}
_SCHEMA_INDEX = {n: i for i, n in enumerate(FEATURE_NAMES)}
_NUMERIC_SCHEMA_INDEX = np.array([_SCHEMA_INDEX[n] for n in NUMERIC_FEATURES])
# The same, as plain Python values for the value-by-value path: (lo, hi, integral, index, name, messages)
_NUMERIC_RULES = tuple(
    (float(lo), float(hi), bool(integral), _SCHEMA_INDEX[name], name, messages)
    for lo, hi, integral, name, messages in zip(
        _LOWER, _UPPER, _INTEGRAL, NUMERIC_FEATURES, _NUMERIC_MESSAGES, strict=True
    )
)


def _in_categories(values: np.ndarray, name: str) -> np.ndarray:
    """Bool [n]: which values are one of the feature's categories (set lookups, run in C)."""
    allowed, items = _CATEGORY_SETS[name], values.tolist()
    try:
        if allowed.issuperset(items):  # the usual case: every value is allowed
            return np.ones(len(items), dtype=bool)
        return np.fromiter(map(allowed.__contains__, items), dtype=bool, count=len(items))
    except TypeError:  # an unhashable value (a list, a dict) is no category either
        return np.array([isinstance(v, str) and v in allowed for v in items], dtype=bool)


# Up to this many rows, checking value by value in Python beats NumPy's cost per call (one row:
# ~5 us against ~50 us). Both paths apply the same rules; the tests hold them equal.
FEW_ROWS = 8


def _length(column: Any) -> int | None:
    """n of a column [n]: a 1-D array or a list; None for anything else."""
    if isinstance(column, np.ndarray):
        return len(column) if column.ndim == 1 else None
    return len(column) if isinstance(column, list) else None


def validate_columns(columns: Mapping[str, np.ndarray | list]) -> ValidatedColumns:
    """Check a batch given as columns: one array [n] per feature (extra keys ignored).

    Numeric features come as float64 arrays, categorical ones as object arrays of str (plain
    lists of JSON values do as well: cheaper for a few rows). Refused, per value, with
    /predict's wording and the feature's allowed values: NaN and infinities, non-integers for
    integer features and flags, values outside a feature's range, and categories outside its
    list (any non-str value included). Vectorised with NumPy over the whole batch; a few rows
    are checked value by value, which is cheaper. Missing features, or columns that are not [n]
    of one n, are the caller's mistake (ValueError), not a row's.
    """
    missing = [n for n in FEATURE_NAMES if n not in columns]
    if missing:
        raise ValueError(f"missing column(s): {', '.join(missing)}")
    lengths = [_length(columns[name]) for name in FEATURE_NAMES]
    n = lengths[0]
    if n is None or lengths.count(n) != len(lengths):
        shapes = {name: np.shape(columns[name]) for name in FEATURE_NAMES}
        raise ValueError(f"columns must be arrays [n] of one length: {shapes}")
    return _check_few(columns, n) if n <= FEW_ROWS else _check_many(columns, n)


def _objects(values: Any) -> np.ndarray:
    """An object array [n] of exactly these values (a list among them stays one value)."""
    if isinstance(values, np.ndarray):
        return values.astype(object, copy=False)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _check_many(columns: Mapping[str, np.ndarray], n: int) -> ValidatedColumns:
    """validate_columns, vectorised: each rule once over the whole matrix."""
    numeric = np.empty((n, len(NUMERIC_FEATURES)), dtype=np.float64)
    for j, name in enumerate(NUMERIC_FEATURES):
        numeric[:, j] = columns[name]
    categorical = {name: _objects(columns[name]) for name in CATEGORICAL_FEATURES}
    # NaN fails every comparison, infinities fail a bound.
    numeric_ok = (numeric >= _LOWER) & (numeric <= _UPPER) & ((numeric == np.floor(numeric)) | ~_INTEGRAL)
    category_ok = {name: _in_categories(categorical[name], name) for name in CATEGORICAL_FEATURES}
    valid = numeric_ok.all(axis=1)
    for ok in category_ok.values():
        valid &= ok
    if valid.all():
        return ValidatedColumns(numeric, categorical, [], valid)

    found: list[tuple[int, int, str, str]] = []  # (row, schema index, feature, message)
    rows, cols = np.nonzero(~numeric_ok)
    values = numeric[rows, cols]
    # A bad value's one error: the first check it fails, in the order of _numeric_messages.
    checks = np.select(
        [~np.isfinite(values), _INTEGRAL[cols] & (values != np.floor(values)), values < _LOWER[cols]],
        [0, 1, 2],
        default=3,
    )
    for row, col, check in zip(rows.tolist(), cols.tolist(), checks.tolist(), strict=True):
        found.append((row, int(_NUMERIC_SCHEMA_INDEX[col]), NUMERIC_FEATURES[col], _NUMERIC_MESSAGES[col][check]))
    for name, ok in category_ok.items():
        index, message = _SCHEMA_INDEX[name], _CATEGORY_MESSAGES[name]
        found.extend((row, index, name, message) for row in np.flatnonzero(~ok).tolist())
    return _with_errors(numeric, categorical, found, valid)


def _check_few(columns: Mapping[str, np.ndarray], n: int) -> ValidatedColumns:
    """validate_columns for a few rows, value by value: the same rules as _check_many."""
    numbers = [_values(columns[name]) for name in NUMERIC_FEATURES]
    numeric = np.array(list(zip(*numbers, strict=True)), dtype=np.float64).reshape(n, len(NUMERIC_FEATURES))
    categorical = {name: _objects(columns[name]) for name in CATEGORICAL_FEATURES}
    found: list[tuple[int, int, str, str]] = []
    for values, (lo, hi, integral, index, name, messages) in zip(numbers, _NUMERIC_RULES, strict=True):
        for row, v in enumerate(values):
            if lo <= v <= hi and (not integral or v == math.floor(v)):
                continue
            check = 0 if not math.isfinite(v) else 1 if integral and v != math.floor(v) else 2 if v < lo else 3
            found.append((row, index, name, messages[check]))
    for name in CATEGORICAL_FEATURES:
        allowed, index, message = _CATEGORY_SETS[name], _SCHEMA_INDEX[name], _CATEGORY_MESSAGES[name]
        for row, v in enumerate(_values(columns[name])):
            try:
                ok = v in allowed
            except TypeError:  # unhashable
                ok = False
            if not ok:
                found.append((row, index, name, message))
    if not found:
        return ValidatedColumns(numeric, categorical, [], np.ones(n, dtype=bool))
    valid = np.ones(n, dtype=bool)
    valid[[row for row, *_ in found]] = False
    return _with_errors(numeric, categorical, found, valid)


def _values(column: np.ndarray | list) -> list:
    return column.tolist() if isinstance(column, np.ndarray) else column


def _with_errors(
    numeric: np.ndarray, categorical: dict[str, np.ndarray], found: list[tuple[int, int, str, str]], valid: np.ndarray
) -> ValidatedColumns:
    found.sort(key=lambda e: (e[0], e[1]))  # row order, then schema order
    return ValidatedColumns(numeric, categorical, [(row, name, msg) for row, _, name, msg in found], valid)
