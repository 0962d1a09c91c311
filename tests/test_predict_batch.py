"""/predict_batch's short way (serving.predict_batch): msgspec accepts exactly the batches BentoML's way
accepts, as the same values, and the answer is Engine.score_records' answer."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pydantic
import pytest

from models.schema import (
    CATEGORICAL_FEATURES,
    EXAMPLE_CUSTOMER,
    FEATURE_NAMES,
    NUMERIC_FEATURES,
    BatchValidationError,
    validate_rows,
)
from serving.predict_batch import batch_decoder, fast_columns, predictions_json

MAX_ROWS = 100
C = EXAMPLE_CUSTOMER
_NUMERIC_AT = [FEATURE_NAMES.index(n) for n in NUMERIC_FEATURES]
_CATEGORICAL_AT = [FEATURE_NAMES.index(n) for n in CATEGORICAL_FEATURES]


class BatchInput(pydantic.BaseModel):  # service.BatchInput's rules (service.py imports bentoml)
    model_config = pydantic.ConfigDict(extra="forbid")
    customers: list[dict] = pydantic.Field(min_length=1, max_length=MAX_ROWS)


def bentomls_way(body: bytes) -> list[tuple] | None:
    """The rows BentoML's way accepts (request model, then the rows), or None."""
    try:
        request = BatchInput.model_validate_json(body)
        return validate_rows(request.customers)
    except (pydantic.ValidationError, BatchValidationError):
        return None


CASES: list[tuple[str, Any]] = [
    ("valid", {"customers": [C, {**C, "Geography": "Spain", "Balance": 5}]}),
    ("an-integral-float-for-an-integer", {"customers": [{**C, "Age": 42.0}]}),
    ("a-boolean-flag", {"customers": [{**C, "HasCrCard": True}]}),
    ("a-number-as-a-string", {"customers": [{**C, "Balance": "10"}]}),
    ("unknown-field", {"customers": [{**C, "Ages": 3}]}),
    ("missing-field", {"customers": [{k: v for k, v in C.items() if k != "Tenure"}]}),
    ("below-the-minimum", {"customers": [C, {**C, "CreditScore": 299}]}),
    ("above-the-maximum", {"customers": [{**C, "EstimatedSalary": 1e12}]}),
    ("not-a-category", {"customers": [{**C, "Gender": "male"}]}),
    ("null", {"customers": [{**C, "Balance": None}]}),
    ("no-rows", {"customers": []}),
    ("too-many-rows", {"customers": [C] * (MAX_ROWS + 1)}),
    ("top-level-typo", {"customers": [C], "explain": True}),
    ("rows-not-objects", {"customers": [[1, 2]]}),
]


@pytest.mark.parametrize("case, request_body", CASES, ids=[c[0] for c in CASES])
def test_the_short_way_accepts_exactly_what_bentomls_way_accepts(case, request_body):
    body = json.dumps(request_body).encode()
    expected = bentomls_way(body)
    columns = fast_columns(batch_decoder(MAX_ROWS), body)
    assert (columns is not None) == (expected is not None), case
    if columns is not None:
        numeric, categorical = columns
        assert numeric.tolist() == [[float(r[i]) for i in _NUMERIC_AT] for r in expected]
        for name, at in zip(CATEGORICAL_FEATURES, _CATEGORICAL_AT, strict=True):
            assert categorical[name].tolist() == [r[at] for r in expected]


@pytest.mark.parametrize("body", [b'{"customers": [{"CreditScore": 1e999}]}', b"", b"[]", b'{"customers": "x"}'])
def test_what_json_cannot_hold_takes_bentomls_way(body):
    assert fast_columns(batch_decoder(MAX_ROWS), body) is None


def test_the_answer_is_score_records_answer():
    proba = np.array([0.1, 0.5, 0.25, 1e-05, 0.9999999999999999])
    got = json.loads(predictions_json(proba, proba >= 0.25, 0.25, "bank_churn:v1"))
    expected = {
        "predictions": [
            {"churn_probability": p, "will_churn": p >= 0.25, "threshold": 0.25, "model_version": "bank_churn:v1"}
            for p in proba.tolist()
        ]
    }
    assert got == expected
