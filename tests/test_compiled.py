"""The ONNX-compiled pipeline against scikit-learn: parity, input paths, thread safety.

A small real model (build_pipeline(fast=True) on 2,000 rows of the real CSV) is fitted once per
module; parity is checked on all 10,000 rows and on synthetic rows placed exactly on, and one
ulp (double and float32) either side of, every split threshold of every tree, which is where a
float32 or otherwise inexact translation flips branches. The parity tests run for the default
hyperparameters and for the tuned ones (training/params.json, fast mode: every learner option
the served model uses, with at most 20 trees per ensemble, 6 deep).
"""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from models.ensemble import build_pipeline
from models.onnx_session import CompiledModel
from models.schema import (
    EXAMPLE_CUSTOMER,
    FEATURE_NAMES,
    FEATURES,
    NUMERIC_FEATURES,
    TARGET,
    frame_from_rows,
    row_values,
    validate_frame,
)
from models.store import COMPILED_FILE
from training.onnx_export import (
    TOLERANCE,
    UnsupportedModelError,
    compile_pipeline,
    learner_parity,
    parity_report,
)
from training.records import load_params

DATA = Path(__file__).resolve().parents[1] / "data" / "Churn_Modelling.csv"


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return validate_frame(pd.read_csv(DATA))


@pytest.fixture(scope="module")
def pipeline(data):
    sample = data.sample(2000, random_state=0)
    pipe = build_pipeline(seed=0, fast=True)
    pipe.fit(sample[list(FEATURE_NAMES)], sample[TARGET])
    return pipe


@pytest.fixture(scope="module")
def onnx_bytes(pipeline) -> bytes:
    return compile_pipeline(pipeline)


@pytest.fixture(scope="module")
def compiled(onnx_bytes) -> CompiledModel:
    return CompiledModel(onnx_bytes, threads=1)


@pytest.fixture(scope="module")
def tuned_pipeline(data):
    params = load_params()
    assert params, "training/params.json has no tuned parameters"
    sample = data.sample(2000, random_state=0)
    pipe = build_pipeline(seed=0, fast=True, params=params)
    pipe.fit(sample[list(FEATURE_NAMES)], sample[TARGET])
    return pipe


@pytest.fixture(scope="module")
def tuned_compiled(tuned_pipeline) -> CompiledModel:
    return CompiledModel(compile_pipeline(tuned_pipeline), threads=1)


@pytest.fixture(params=["defaults", "tuned"])
def model(request) -> tuple:
    """(fitted pipeline, its compiled model) for the default and for the tuned hyperparameters."""
    if request.param == "tuned":
        return request.getfixturevalue("tuned_pipeline"), request.getfixturevalue("tuned_compiled")
    return request.getfixturevalue("pipeline"), request.getfixturevalue("compiled")


def _rows(frame: pd.DataFrame) -> list[tuple]:
    """Frame rows as the service passes them: ints for int/flag features, floats, strings."""
    kinds = [f.kind for f in FEATURES]
    return [
        tuple(int(v) if k in ("int", "flag") else v for v, k in zip(rec, kinds, strict=True))
        for rec in frame[list(FEATURE_NAMES)].itertuples(index=False, name=None)
    ]


def _split_values(pipeline) -> dict[int, set[float]]:
    """Every numeric split threshold of every tree of the stack, by numeric feature index."""
    stack = pipeline.named_steps["stack"].named_estimators_
    n_numeric = len(NUMERIC_FEATURES)
    out: dict[int, set[float]] = {i: set() for i in range(n_numeric)}
    sk_trees = list(stack["random_forest"].estimators_) + list(stack["gradient_boosting"].estimators_[:, 0])
    for tree in sk_trees:
        feature, threshold = tree.tree_.feature, tree.tree_.threshold
        for f, t in zip(feature, threshold, strict=True):
            if 0 <= f < n_numeric:
                out[f].add(float(t))
    booster = stack["xgboost"].get_booster()
    for t in json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]:
        for left, f, c in zip(t["left_children"], t["split_indices"], t["split_conditions"], strict=True):
            if left >= 0 and f < n_numeric:
                out[f].add(float(np.float32(c)))

    def walk(node: dict) -> None:
        if "split_index" in node:
            if node["split_feature"] < n_numeric:
                out[node["split_feature"]].add(float(node["threshold"]))
            walk(node["left_child"])
            walk(node["right_child"])

    for info in stack["lightgbm"].booster_.dump_model()["tree_info"]:
        walk(info["tree_structure"])
    return out


def _near_split_frame(pipeline, data: pd.DataFrame) -> pd.DataFrame:
    """Real rows with one numeric feature moved onto / next to a split threshold."""
    up, down = np.inf, -np.inf
    parts = []
    for i, (feature, thresholds) in enumerate(_split_values(pipeline).items()):
        values: set[float] = set()
        for t in thresholds:
            f32 = np.float32(t)
            values.update([t, np.nextafter(t, down), np.nextafter(t, up)])
            values.update(
                float(v) for v in (f32, np.nextafter(f32, np.float32(down)), np.nextafter(f32, np.float32(up)))
            )
            # the double values where float32 rounding switches between neighbouring floats
            for lo in (f32, np.nextafter(f32, np.float32(down))):
                mid = (float(lo) + float(np.nextafter(lo, np.float32(up)))) / 2
                values.update([mid, np.nextafter(mid, down), np.nextafter(mid, up)])
        column = np.array(sorted(v for v in values if v >= 0))
        rows = data[list(FEATURE_NAMES)].sample(len(column), replace=True, random_state=i).reset_index(drop=True)
        rows[NUMERIC_FEATURES[feature]] = column
        parts.append(rows)
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_parity_on_all_rows(model, data, threshold):
    pipeline, compiled = model
    report = parity_report(pipeline, compiled, data, threshold)
    assert report["rows"] == len(data) == 10_000
    assert report["tolerance"] == TOLERANCE == 1e-6
    assert report["max_abs_diff"] <= 1e-6, report
    assert report["decision_mismatches"] == 0, report
    assert report["passed"] is True


def test_each_base_learner_matches(model, data):
    pipeline, compiled = model
    diffs = learner_parity(pipeline, compiled, data)
    assert list(diffs) == ["random_forest", "gradient_boosting", "xgboost", "lightgbm", "logistic"]
    # No transcendental functions in the forest: sums in scikit-learn's order are bit-identical.
    assert diffs["random_forest"] == 0.0
    # Double learners: last-ulp exp/dot differences only. XGBoost's probability is float32 (ulp 6e-8).
    for name in ("gradient_boosting", "lightgbm", "logistic"):
        assert diffs[name] <= 1e-12, diffs
    assert diffs["xgboost"] <= 1.2e-7, diffs


def test_parity_on_rows_next_to_every_split(model, data):
    pipeline, compiled = model
    frame = _near_split_frame(pipeline, data)
    assert len(frame) > 1000
    report = parity_report(pipeline, compiled, frame, 0.5)
    assert report["max_abs_diff"] <= 1e-6, report
    assert report["decision_mismatches"] == 0, report
    assert learner_parity(pipeline, compiled, frame)["random_forest"] == 0.0


# ---------------------------------------------------------------- inputs


def test_rows_and_frame_inputs_agree(compiled, data):
    frame = data[list(FEATURE_NAMES)]
    by_frame = compiled.predict_proba_frame(frame)
    rows = _rows(frame)
    by_rows = compiled.predict_proba_rows(rows)
    assert by_rows.dtype == by_frame.dtype == np.float64
    assert by_rows.shape == by_frame.shape == (len(frame),)
    np.testing.assert_array_equal(by_rows, by_frame)
    # One row at a time: ONNX Runtime's vectorised exp may round the last bit differently.
    singles = np.array([compiled.predict_proba_rows([r])[0] for r in rows[:500]])
    np.testing.assert_allclose(singles, by_frame[:500], rtol=0, atol=1e-12)


def test_example_customer(pipeline, compiled):
    row = row_values(EXAMPLE_CUSTOMER)
    expected = pipeline.predict_proba(frame_from_rows([EXAMPLE_CUSTOMER]))[:, 1]
    got = compiled.predict_proba_rows([row])
    assert got.shape == (1,)
    assert abs(got[0] - expected[0]) <= 1e-6


def test_empty_inputs(compiled, data):
    assert compiled.predict_proba_rows([]).shape == (0,)
    assert compiled.predict_proba_frame(data.iloc[:0]).shape == (0,)


def test_unknown_category_is_an_error(compiled):
    row = list(row_values(EXAMPLE_CUSTOMER))
    row[FEATURE_NAMES.index("Geography")] = "Italy"
    with pytest.raises(ValueError, match="Geography"):
        compiled.predict_proba_rows([tuple(row)])


# ---------------------------------------------------------------- runtime behaviour


def test_concurrent_single_row_calls_agree(compiled, data):
    rows = _rows(data.sample(200, random_state=3))
    expected = [compiled.predict_proba_rows([r])[0] for r in rows]
    start = threading.Barrier(4)

    def worker(seed: int) -> list[tuple[int, float]]:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        start.wait()
        return [(i, compiled.predict_proba_rows([rows[i]])[0]) for _ in range(3) for i in order]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(worker, range(4)))
    for result in results:
        assert len(result) == 3 * len(rows)
        for i, p in result:
            assert p == expected[i]


def test_concurrent_batch_calls_agree(compiled, data):
    frame = data[list(FEATURE_NAMES)].iloc[:2000]
    expected = compiled.predict_proba_frame(frame)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: compiled.predict_proba_frame(frame), range(8)))
    for got in results:
        np.testing.assert_array_equal(got, expected)


def test_compile_is_deterministic_and_valid(pipeline, onnx_bytes, tmp_path):
    assert compile_pipeline(pipeline) == onnx_bytes
    model = onnx.load_from_string(onnx_bytes)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["numeric", "Geography", "Gender"]
    assert [o.name for o in model.graph.output] == ["p_churn", "base_proba"]
    # Saved and loaded as a file, the model predicts the same.
    path = tmp_path / COMPILED_FILE
    path.write_bytes(onnx_bytes)
    again = CompiledModel(path.read_bytes())
    rows = [row_values(EXAMPLE_CUSTOMER)]
    assert again.predict_proba_rows(rows)[0] == CompiledModel(onnx_bytes).predict_proba_rows(rows)[0]


def test_unsupported_learner_is_refused(data):
    from sklearn.neighbors import KNeighborsClassifier

    sample = data.sample(300, random_state=1)
    pipe = build_pipeline(seed=0, fast=True, base_learners=[("knn", KNeighborsClassifier())])
    pipe.fit(sample[list(FEATURE_NAMES)], sample[TARGET])
    with pytest.raises(UnsupportedModelError, match="knn"):
        compile_pipeline(pipe)


def test_unsupported_meta_learner_is_refused(data):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    sample = data.sample(300, random_state=1)
    pipe = build_pipeline(seed=0, fast=True)
    pipe.named_steps["stack"].final_estimator = Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression())])
    pipe.fit(sample[list(FEATURE_NAMES)], sample[TARGET])
    with pytest.raises(UnsupportedModelError, match="LogOdds then LogisticRegression"):
        compile_pipeline(pipe)
