"""The schema's rules applied to whole columns at once, with NumPy: the Open Inference
Protocol's tensors, the scoring jobs' CSV chunks and the Spark job's Arrow batches are checked
here, with /predict's wording.

Kept apart from models/schema.py so that importing the schema (the `bentoml serve` arbiter
does, to check the model cheaply) does not import NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.schema import BY_NAME, CATEGORICAL_FEATURES, FEATURE_NAMES, NUMERIC_FEATURES, Feature


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


# ---------------------------------------------------------------- cells of text (CSV)


def _parse_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # not a number at all; None marks it for its own message
        return None


def not_a_number(feature: Feature, found: str) -> str:
    """The message for a numeric feature's cell that holds no number at all: what it should be,
    what was found ("an empty cell", "null", "unable to parse 'x'"), and the allowed values."""
    noun = "an integer" if feature.kind in ("int", "flag") else "a number"
    return f"Input should be {noun}, {found} (allowed: {feature.allowed()})"


def number_cells(
    cells: Sequence[str | None], feature: Feature, empty: str = "an empty cell"
) -> tuple[np.ndarray, dict[int, str]]:
    """A numeric column given as text cells (CSV) as float64, and the offsets of cells that are no
    number at all, with their message (a missing cell, None, is worded `empty`). Range, integer
    and finiteness rules are validate_columns'; those cells hold 0.0 for it."""
    try:
        return np.fromiter(map(float, cells), dtype=np.float64, count=len(cells)), {}
    except (ValueError, TypeError):
        pass
    values = [None if c is None else _parse_number(c) for c in cells]
    bad = {i: not_a_number(feature, _found(cells[i], empty)) for i, v in enumerate(values) if v is None}
    return np.array([0.0 if v is None else v for v in values], dtype=np.float64), bad


def _found(cell: str | None, empty: str) -> str:
    if cell is None:
        return f"found {empty}"
    return "found an empty cell" if not cell.strip() else f"unable to parse {cell[:40]!r}"
