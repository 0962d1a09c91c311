"""The customer feature schema: defined once, used everywhere.

Training validates the CSV against it, the service builds its request model from it and
checks that the served model was trained with the same schema, and the tests and load
tests draw their payloads from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

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
    import numpy as np
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
