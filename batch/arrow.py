"""One Arrow record batch in, one scored record batch out: the executors' core, with pyarrow
and NumPy only (no Spark, no pandas, no scikit-learn unless the pipeline fallback serves).

Typed columns (Parquet: integers, floats, decimals) and text columns (CSV: every cell a
string) are both read; cells become the columns `models.columns.validate_columns` checks, so
a bad row gets /predict's rules and wording, and the scoring jobs' for cells that hold no
number at all. Bad rows are answered with their `error`, never dropped and never fatal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.columns import not_a_number, number_cells, validate_columns
from models.predictor import Predictor
from models.schema import BY_NAME, CATEGORICAL_FEATURES, FEATURE_NAMES

PROBABILITY = "churn_probability"
DECISION = "will_churn"
MODEL_VERSION = "model_version"
ERROR = "error"
OUTPUT_FIELDS = (
    pa.field(PROBABILITY, pa.float64()),
    pa.field(DECISION, pa.bool_()),
    pa.field(MODEL_VERSION, pa.string()),
    pa.field(ERROR, pa.string()),
)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def type_problem(name: str, kind: pa.DataType) -> str | None:
    """Why a feature column of this Arrow type cannot be read, or None. A wrong type is the whole
    file's problem (like a missing column), not a row's, so the job refuses it before it starts."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    feature = BY_NAME[name]
    if feature.kind == "category":
        if _is_text(kind):
            return None
        return f"column '{name}' is {kind}; it must be text ({feature.allowed()})"
    if _is_number(kind) or _is_text(kind):
        return None
    return f"column '{name}' is {kind}; it must be numbers (integer, floating point or decimal) or text"


@dataclass(frozen=True)
class Scoring:
    """What every batch of one job is scored with: the loaded predictor, the tag it answers as,
    the columns passed through, and how a missing numeric cell is named in messages."""

    predictor: Predictor
    tag: str
    keep: tuple[str, ...] = ()
    empty: str = "null"  # "an empty cell" when the input is CSV, as the scoring jobs say


def _plain(column: pa.Array) -> pa.Array:
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _numbers(column: pa.Array, name: str, empty: str) -> tuple[np.ndarray, dict[int, str]]:
    """A numeric feature's column as float64 (0.0 where a cell has no number), and the offsets of
    cells without a number with their message."""
    feature = BY_NAME[name]
    if _is_text(column.type):
        return number_cells(column.to_pylist(), feature, empty)
    bad: dict[int, str] = {}
    if column.null_count:
        message = not_a_number(feature, f"found {empty}")
        bad = {i: message for i in np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)).tolist()}
        column = pc.fill_null(column, 0)
    # Unsafe casts only round: an integer beyond 2**53 or a decimal becomes the nearest float64,
    # which the range check then judges (no value in range is rounded).
    return pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False), bad


def score_batch(batch: pa.RecordBatch, scoring: Scoring) -> pa.RecordBatch:
    """Score one record batch: the kept columns, then churn_probability, will_churn,
    model_version and error, one output row per input row, in the same order."""
    n = batch.num_rows
    columns: dict[str, np.ndarray] = {}
    problems: dict[int, dict[int, str]] = {}  # row -> {schema index: "Feature: message"}
    for index, name in enumerate(FEATURE_NAMES):
        column = _plain(batch.column(name))
        if name in CATEGORICAL_FEATURES:
            columns[name] = column.to_numpy(zero_copy_only=False)  # str, or None for a null
            continue
        columns[name], unreadable = _numbers(column, name, scoring.empty)
        for row, message in unreadable.items():
            problems.setdefault(row, {})[index] = f"{name}: {message}"
    checked = validate_columns(columns)
    for row, name, message in checked.errors:  # one error a cell: a missing number's comes first
        problems.setdefault(row, {}).setdefault(FEATURE_NAMES.index(name), f"{name}: {message}")
    ok = checked.valid
    if problems:
        ok = ok.copy()
        ok[list(problems)] = False
    probability = np.zeros(n, dtype=np.float64)
    if ok.all():
        probability = scoring.predictor.predict_columns(checked.numeric, checked.categorical)
    elif ok.any():
        categorical = {name: values[ok] for name, values in checked.categorical.items()}
        probability[ok] = scoring.predictor.predict_columns(checked.numeric[ok], categorical)
    failed = None if ok.all() else ~ok
    if problems:
        errors = [None] * n
        for row, found in problems.items():
            errors[row] = "; ".join(found[i] for i in sorted(found))
        error = pa.array(errors, type=pa.string())
    else:
        error = pa.nulls(n, pa.string())
    arrays = [batch.column(name) for name in scoring.keep]
    arrays += [
        pa.array(probability, type=pa.float64(), mask=failed),
        pa.array(probability >= scoring.predictor.threshold, type=pa.bool_(), mask=failed),
        pa.repeat(pa.scalar(scoring.tag, pa.string()), n),
        error,
    ]
    names = [*scoring.keep, *(f.name for f in OUTPUT_FIELDS)]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def score_batches(batches, scoring: Scoring | Callable[[], Scoring]):
    """score_batch over an iterator of record batches (what Spark's mapInArrow hands a task).
    `scoring` may be a function that loads it: it is called only when a first batch arrives,
    so an empty partition loads nothing."""
    loaded = scoring if isinstance(scoring, Scoring) else None
    for batch in batches:
        if loaded is None:
            loaded = scoring()
        if batch.num_rows:
            yield score_batch(batch, loaded)
