"""CSV scoring jobs: parse, validate row by row, score the good rows, report the bad ones."""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any

import pydantic

from models.schema import BY_NAME, FEATURE_NAMES, ID_COLUMN, Customer, row_values
from serving import telemetry
from serving.http import describe_validation_errors

_INT = re.compile(r"^[+-]?\d+$")


class CsvError(ValueError):
    """The file as a whole cannot be scored (not CSV, missing columns, too many rows)."""


def _coerce(name: str, text: str) -> Any:
    """CSV cells are text: turn them into the JSON types the schema validates."""
    kind = BY_NAME[name].kind
    text = text.strip()
    if kind == "category" or text == "":
        return text if text != "" else None
    if kind in ("int", "flag"):
        if _INT.match(text):
            try:
                return int(text)
            except ValueError:  # more digits than Python converts; the schema reports it
                return text
        try:
            value = float(text)
        except ValueError:
            return text
        return int(value) if math.isfinite(value) and value.is_integer() else value
    try:
        return float(text)
    except ValueError:
        return text


def parse_csv(data: bytes, max_rows: int) -> tuple[list[tuple], list[dict[str, Any]], list[dict[str, Any]]]:
    """Returns (rows to score, their row info, per-row errors). Rows count from 1."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CsvError(f"the file is not UTF-8 text ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [n for n in FEATURE_NAMES if n not in header]
    if missing:
        raise CsvError(f"missing column(s): {', '.join(missing)} (header has: {', '.join(header) or 'nothing'})")
    rows, info, errors = [], [], []
    try:
        records = list(enumerate(reader, start=1))
    except csv.Error as exc:  # e.g. a field over the csv module's 128 KiB limit
        raise CsvError(f"unreadable CSV: {exc}") from None
    for number, record in records:
        if number > max_rows:
            raise CsvError(f"more than {max_rows} rows; split the file")
        ident = record.get(ID_COLUMN)
        if None in record or any(record.get(n) is None for n in FEATURE_NAMES):
            errors.append({"row": number, "customer_id": ident, "error": "wrong number of fields on this line"})
            continue
        candidate = {n: _coerce(n, record[n]) for n in FEATURE_NAMES}
        try:
            customer = Customer.model_validate(candidate)
        except pydantic.ValidationError as exc:
            errors.append(
                {"row": number, "customer_id": ident, "error": "; ".join(describe_validation_errors(exc.errors()))}
            )
            continue
        rows.append(row_values(customer))
        info.append({"row": number, "customer_id": ident})
    return rows, info, errors


def score_csv_bytes(predictor: Any, data: bytes, max_rows: int) -> dict[str, Any]:
    """Score a CSV file's valid rows; report invalid rows individually."""
    with telemetry.stage("csv_parse"):
        try:
            rows, info, errors = parse_csv(data, max_rows)
        except CsvError as exc:
            return {
                "status": "rejected",
                "error": str(exc),
                "rows": 0,
                "scored": 0,
                "failed": 0,
                "predictions": [],
                "errors": [],
            }
    predictions = []
    if rows:
        telemetry.BATCH_ROWS.observe(len(rows))
        with telemetry.stage("predict"):
            proba = predictor.predict_rows(rows)
        telemetry.record_predictions(proba, predictor.threshold)
        predictions = [
            {**meta, "churn_probability": float(p), "will_churn": bool(p >= predictor.threshold)}
            for meta, p in zip(info, proba, strict=False)
        ]
    return {
        "status": "completed",
        "model_version": predictor.bundle.tag,
        "threshold": predictor.threshold,
        "rows": len(rows) + len(errors),
        "scored": len(rows),
        "failed": len(errors),
        "predictions": predictions,
        "errors": errors,
    }
