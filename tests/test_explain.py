"""Explanations on both backends: exact, additive, and the same."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.predictor import Predictor, log_odds
from models.schema import FEATURE_NAMES, row_values
from models.store import get_stored, load_bundle


@pytest.fixture(scope="module")
def predictors(trained):
    bundle = load_bundle(get_stored(str(trained.model.tag)))
    compiled, plain = Predictor(bundle, prefer_compiled=True), Predictor(bundle, prefer_compiled=False)
    assert (compiled.backend, plain.backend) == ("onnxruntime", "sklearn")
    return compiled, plain


@pytest.mark.parametrize("index", [0, 7, 42])
def test_contributions_add_up_and_backends_agree(predictors, dataset, index):
    row = row_values(dataset[list(FEATURE_NAMES)].iloc[index].to_dict())
    compiled, plain = (p.explain(row) for p in predictors)
    for e, p in zip((compiled, plain), predictors, strict=True):
        total = e["base_value"] + sum(c["contribution"] for c in e["contributions"])
        assert math.isclose(total, e["log_odds"], abs_tol=1e-9)
        assert math.isclose(e["log_odds"], float(log_odds(p.predict_rows([row]))[0]), abs_tol=1e-9)
    by_feature = {c["feature"]: c["contribution"] for c in plain["contributions"]}
    np.testing.assert_allclose(
        [c["contribution"] for c in compiled["contributions"]],
        [by_feature[c["feature"]] for c in compiled["contributions"]],
        atol=1e-6,
    )


def test_explanations_are_deterministic(predictors, dataset):
    row = row_values(dataset[list(FEATURE_NAMES)].iloc[3].to_dict())
    compiled, _ = predictors
    assert compiled.explain(row) == compiled.explain(row)
