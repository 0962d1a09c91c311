"""Training through the real code path: fit, evaluate, save, load back from the store; the
threshold rule, the cross-validated estimate, per-group metrics and the tuned parameters."""

from __future__ import annotations

import math

import bentoml
import numpy as np
import pandas as pd
import pytest

from models.ensemble import BASE_LEARNERS, FAST_DEPTH, FAST_TREES, TUNABLE, resolve_params
from models.schema import FEATURE_NAMES, TARGET, schema_dict
from models.store import PIPELINE_FILE, get_stored, load_bundle
from training.__main__ import parse_args
from training.cv import LEARNERS, cross_validate, cv_key, stored_estimate
from training.data import DEFAULT_DATA, file_sha256
from training.decision import CostModel, capture_rate, choose_ev_threshold, value_curve
from training.evaluate import PROBABILITY_METRICS, churn_proba
from training.groups import GROUP_FEATURES, GROUP_METRICS, age_band, group_gaps, group_metrics
from training.pipeline import TrainConfig, check_metadata, train
from training.records import CV_FILE, PARAMS_FILE, load_params, params_sha256, read_json

REPORT_FILES = ("report.json", "report.md", "roc.png", "precision_recall.png", "calibration.png", "gains.png")


def test_progress_reports_every_learner_and_fold(trained):
    log = "\n".join(trained.log)
    for stage in ("[load]", "[cross-validate]", "[fit]", "[evaluate]", "[compile]", "[save]"):
        assert f"{stage} done in" in log
    for name in BASE_LEARNERS:
        assert f"{name}" in log and "full fit" in log
        for fold in (1, 2, 3):
            assert any(name in line and f"fold {fold}/3" in line for line in trained.log)


def test_saved_model_predicts_as_before_saving(trained, dataset):
    X = dataset[list(FEATURE_NAMES)].head(500)
    before = trained.pipeline.predict_proba(X)[:, 1]
    bundle = load_bundle(get_stored(str(trained.model.tag)))
    after = bundle.pipeline.predict_proba(X)[:, 1]
    np.testing.assert_array_equal(before, after)


def test_saved_pipeline_contains_only_library_estimators(trained):
    stack = trained.pipeline.named_steps["stack"]
    modules = {type(est).__module__.split(".")[0] for est in stack.estimators_}
    assert modules <= {"sklearn", "xgboost", "lightgbm"}
    assert list(stack.named_estimators_) == list(BASE_LEARNERS)


def test_metadata_is_complete(trained):
    model = bentoml.models.get(trained.model.tag)
    meta, labels = model.info.metadata, model.info.labels
    assert labels["framework"] == "sklearn" and labels["stage"] == "dev"
    assert 0 < meta["threshold"] < 1
    assert set(meta["metrics"]) >= {"roc_auc", "pr_auc", "brier", "precision", "recall", "f1"}
    assert set(meta["base_learners_test_roc_auc"]) == set(BASE_LEARNERS)
    assert meta["feature_schema"] == schema_dict()
    assert len(meta["data"]["sha256"]) == 64
    assert meta["data"]["rows"] == 10_000
    assert meta["data"]["train_rows"] + meta["data"]["validation_rows"] + meta["data"]["test_rows"] == 10_000
    assert meta["seed"] == 42
    assert {"scikit-learn", "xgboost", "lightgbm", "python"} <= set(meta["library_versions"])
    assert model.path_of(PIPELINE_FILE)
    check_metadata(dict(meta))  # finite, no None anywhere (what /model_card serialises)


def test_metadata_has_the_cross_validated_estimate(trained):
    cv = bentoml.models.get(trained.model.tag).info.metadata["cross_validation"]
    for metric in PROBABILITY_METRICS:
        assert set(cv[metric]) == {"stack", *BASE_LEARNERS}
        for learner in LEARNERS:
            assert set(cv[metric][learner]) == {"mean", "std"}
            assert cv[metric][learner]["std"] > 0
    best = cv["stack_minus_best"]["learner"]
    assert best in BASE_LEARNERS
    # Measured on the development rows only (train + validation), never the test split.
    data = trained.report["data"]
    assert cv["scheme"]["rows"] == data["train_rows"] + data["validation_rows"]
    assert (cv["scheme"]["folds"], cv["scheme"]["repeats"]) == (3, 1)  # fast mode's scheme


def test_metadata_has_the_decision_and_group_metrics(trained):
    meta = bentoml.models.get(trained.model.tag).info.metadata
    d = meta["decision"]
    assert (d["offer_cost"], d["customer_value"]) == (100.0, 500.0)
    assert d["threshold"] == meta["threshold"]  # the served threshold is the expected-value one
    assert "expected value" in meta["threshold_rule"]
    assert {"expected_value", "precision", "recall", "offer_rate", "validation", "f1_threshold"} <= set(d)
    assert set(d["capture_rate"]) == {"top_10_percent", "top_20_percent"}
    assert 0.1 < d["capture_rate"]["top_10_percent"] < d["capture_rate"]["top_20_percent"] <= 1
    assert d["f1_threshold"]["threshold"] != d["threshold"]
    groups = meta["group_metrics"]
    assert set(groups) == set(GROUP_FEATURES)
    assert set(groups["Geography"]) == {"France", "Germany", "Spain"}
    assert set(groups["age_band"]) == {"18-29", "30-39", "40-49", "50-59", "60+"}
    for feature in GROUP_FEATURES:
        assert sum(g["count"] for g in groups[feature].values()) == meta["data"]["test_rows"]
        for g in groups[feature].values():
            assert set(GROUP_METRICS) <= set(g)
        assert set(meta["group_gaps"][feature]) == set(GROUP_METRICS)
    assert meta["calibration"]["applied"] == "none"
    assert meta["tuning"]["params_sha256"] == params_sha256(meta["tuning"]["params"])


def test_evaluation_is_honest_and_sane(trained):
    test = trained.report["evaluation"]["test"]
    assert 0.80 < test["roc_auc"] < 0.95  # fast learners; the full model reaches ~0.87
    assert 0 < test["brier"] < 0.2
    # the stack is at least as good as its weakest learner on the same rows
    assert test["roc_auc"] >= min(trained.report["evaluation"]["base_learners_test_roc_auc"].values())
    splits = trained.splits
    assert not set(splits.test.index) & set(splits.train.index)
    assert not set(splits.validation.index) & (set(splits.train.index) | set(splits.test.index))


def test_same_seed_and_data_give_same_predictions(dataset, tmp_path):
    cfg = TrainConfig(fast=True, sample=2000, compile=False, report_dir=None)
    a = train(cfg, log=lambda _: None)
    b = train(cfg, log=lambda _: None)
    assert a.model.tag != b.model.tag  # two versions in the store
    X = dataset[list(FEATURE_NAMES)]
    np.testing.assert_array_equal(a.pipeline.predict_proba(X), b.pipeline.predict_proba(X))
    assert a.report["cross_validation"]["roc_auc"] == b.report["cross_validation"]["roc_auc"]
    assert a.report["threshold"] == b.report["threshold"]


def test_fit_on_a_small_sample(tmp_path):
    cfg = TrainConfig(fast=True, sample=1500, compile=False, report_dir=tmp_path, offer_cost=50, customer_value=400)
    result = train(cfg, log=lambda _: None)
    assert result.report["data"]["rows"] == 1500
    assert (result.report["decision"]["offer_cost"], result.report["decision"]["customer_value"]) == (50, 400)
    for name in (*REPORT_FILES, "expected_value.png"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    for section in ("Cross-validated estimate", "Decisions in money", "Per-group metrics", "Calibration"):
        assert f"## {section}" in md


# ---------------------------------------------------------------- the expected-value threshold

EV_CASES = [
    # (id, P(churn), churned, offer cost, customer value, expected threshold)
    ("best-is-top-three", [0.9, 0.8, 0.6, 0.4, 0.2], [1, 0, 1, 0, 0], 1, 3, 0.5),
    ("nobody-is-worth-an-offer", [0.9, 0.5], [0, 0], 1, 3, 0.95),
    ("ties-go-to-the-higher-threshold", [0.9, 0.8, 0.7], [1, 0, 1], 1, 2, 0.85),
    ("equal-scores-are-offered-together", [0.8, 0.6, 0.6], [1, 1, 0], 1, 1.5, 0.7),
    ("everyone", [0.9, 0.5, 0.2], [1, 1, 1], 1, 3, 0.1),
    ("order-of-rows-does-not-matter", [0.2, 0.6, 0.9, 0.4, 0.8], [0, 1, 1, 0, 0], 1, 3, 0.5),
]


@pytest.mark.parametrize(
    ("proba", "y", "cost", "value", "expected"), [c[1:] for c in EV_CASES], ids=[c[0] for c in EV_CASES]
)
def test_expected_value_threshold_table(proba, y, cost, value, expected):
    threshold = choose_ev_threshold(np.array(y), np.array(proba), CostModel(cost, value))
    assert threshold == pytest.approx(expected)
    assert threshold not in proba  # nobody sits exactly on it


def _brute_force_threshold(y: np.ndarray, proba: np.ndarray, cost: CostModel) -> tuple[float, float]:
    """Every candidate cut p >= t, scored with the cost matrix: (lowest offered p, its value)."""
    per_customer = np.where(y == 1, cost.customer_value - cost.offer_cost, -cost.offer_cost)
    best_p, best_value = math.inf, 0.0  # offering nobody is worth 0
    for t in sorted(set(proba.tolist()), reverse=True):  # highest first: ties keep the higher cut
        value = float(per_customer[proba >= t].sum())
        if value > best_value:
            best_p, best_value = t, value
    return best_p, best_value


@pytest.mark.parametrize(("offer_cost", "customer_value"), [(100, 500), (50, 500), (200, 500), (10, 1000)])
def test_threshold_maximises_the_value_of_a_fitted_model(trained, offer_cost, customer_value):
    y = trained.splits.validation[TARGET].to_numpy()
    proba = churn_proba(trained.pipeline, trained.splits.validation[list(FEATURE_NAMES)])
    cost = CostModel(offer_cost, customer_value)
    threshold = choose_ev_threshold(y, proba, cost)
    lowest_offered, best_value = _brute_force_threshold(y, proba, cost)
    assert proba[proba >= threshold].min() == lowest_offered
    assert not np.any(proba == threshold)
    assert cost.expected_value(y, proba >= threshold) == pytest.approx(best_value)
    _, values = value_curve(y, proba, cost)
    assert values.max() == pytest.approx(best_value)


def test_served_threshold_is_the_expected_value_threshold(trained):
    y = trained.splits.validation[TARGET].to_numpy()
    proba = churn_proba(trained.pipeline, trained.splits.validation[list(FEATURE_NAMES)])
    assert trained.report["threshold"] == choose_ev_threshold(y, proba, CostModel(100, 500))


def test_dearer_offers_raise_the_threshold(trained):
    y = trained.splits.validation[TARGET].to_numpy()
    proba = churn_proba(trained.pipeline, trained.splits.validation[list(FEATURE_NAMES)])
    thresholds = [choose_ev_threshold(y, proba, CostModel(c, 500)) for c in (10, 50, 100, 200, 400)]
    assert thresholds == sorted(thresholds)


@pytest.mark.parametrize(
    ("share", "expected"),
    [(0.1, 0.5), (0.2, 1.0), (0.5, 1.0)],
)
def test_capture_rate(share, expected):
    proba = np.linspace(1, 0, 10, endpoint=False)  # row 0 scores highest
    y = np.zeros(10, int)
    y[[0, 1]] = 1
    assert capture_rate(y, proba, share) == expected


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--offer-cost", "0"], "must be positive"),
        (["--customer-value", "-5"], "must be positive"),
        (["--cv-folds", "1"], "at least 2"),
    ],
)
def test_bad_cost_arguments_are_refused(argv, error, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert error in capsys.readouterr().err


def test_cost_arguments_reach_the_config():
    cfg, _ = parse_args(["--offer-cost", "25", "--customer-value", "300", "--default-params"])
    assert (cfg.offer_cost, cfg.customer_value, cfg.params_file) == (25, 300, None)


# ---------------------------------------------------------------- per-group metrics


@pytest.mark.parametrize(
    ("age", "band"),
    [
        (18, "18-29"),
        (29, "18-29"),
        (30, "30-39"),
        (39, "30-39"),
        (40, "40-49"),
        (59, "50-59"),
        (60, "60+"),
        (92, "60+"),
    ],
)
def test_age_bands(age, band):
    assert age_band(pd.Series([float(age)])).tolist() == [band]


def test_group_table_by_hand():
    frame = pd.DataFrame(
        {
            "Geography": ["France", "France", "France", "France", "Germany", "Germany", "Germany", "Spain", "Spain"],
            "Gender": ["Female", "Male", "Female", "Male", "Female", "Male", "Female", "Male", "Male"],
            "Age": [25, 35, 45, 55, 65, 25, 35, 45, 55],
        }
    )
    y = pd.Series([1, 0, 1, 0, 1, 1, 0, 0, 0])
    proba = np.array([0.9, 0.6, 0.4, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6])
    groups = group_metrics(frame, y, proba, threshold=0.5)
    france = groups["Geography"]["France"]
    # France: offered rows 0, 1 (p >= 0.5); churners rows 0, 2.
    assert france == {
        "count": 4,
        "churn_rate": 0.5,
        "positive_rate": 0.5,
        "recall": 0.5,
        "precision": 0.5,
        "roc_auc": 0.75,
    }
    germany = groups["Geography"]["Germany"]  # offered rows 4, 6; churners 4, 5
    assert (germany["positive_rate"], germany["recall"], germany["precision"]) == pytest.approx((2 / 3, 0.5, 0.5))
    assert germany["roc_auc"] == 0.5
    spain = groups["Geography"]["Spain"]  # no churners: recall 0, AUC undefined and left out
    assert "roc_auc" not in spain and spain["positive_rate"] == 0.5 and spain["precision"] == 0.0
    assert set(groups["age_band"]) == {"18-29", "30-39", "40-49", "50-59", "60+"}
    gaps = group_gaps(groups)
    assert gaps["Geography"]["positive_rate"] == {"gap": pytest.approx(1 / 6), "highest": "Germany", "lowest": "France"}
    assert gaps["Geography"]["roc_auc"] == {"gap": 0.25, "highest": "France", "lowest": "Germany"}
    check_metadata(groups)


# ---------------------------------------------------------------- cross-validation


def test_cross_validation_scores_every_learner_on_paired_folds(dataset):
    sample = dataset.sample(1200, random_state=3)
    cv = cross_validate(
        sample[list(FEATURE_NAMES)], sample[TARGET], seed=0, fast=True, folds=2, repeats=2, progress=lambda _: None
    )
    assert cv["scheme"]["folds"] * cv["scheme"]["repeats"] == 4
    best = cv["stack_minus_best"]["learner"]
    assert cv["roc_auc"][best]["mean"] == max(cv["roc_auc"][n]["mean"] for n in BASE_LEARNERS)
    for metric in PROBABILITY_METRICS:
        d = cv["stack_minus_best"][metric]
        # The mean of paired differences is the difference of the means: same folds for both.
        assert d["mean"] == pytest.approx(cv[metric]["stack"]["mean"] - cv[metric][best]["mean"], abs=1e-12)
        # Nadeau-Bengio: var * (1/n + n_test/n_train); 4 folds, each holding out half the rows.
        assert d["corrected_se"] == pytest.approx(d["std"] * math.sqrt(1 / 4 + 1))
        assert 0 <= d["stack_better_folds"] <= d["folds"] == 4
    cal = cv["stack_calibration"]
    assert 0 < cal["brier"] < 0.25 and cal["slope"] > 0
    check_metadata(cv)


def test_committed_estimate_is_the_one_default_training_uses():
    record = read_json(CV_FILE)
    assert record is not None, f"{CV_FILE.name} missing: run python -m training.cv"
    params = load_params()
    assert record["params"] == resolve_params(params)
    # The key `python -m training` computes for its default run (8,000 development rows, 5x3).
    key = cv_key(file_sha256(DEFAULT_DATA), 42, 0.2, 8000, False, params, 5, 3)
    assert stored_estimate(key) is not None, "the committed estimate is stale: run python -m training.cv"
    # Anything else is another measurement: another seed, scheme, or model.
    assert stored_estimate({**key, "seed": 43}) is None
    assert stored_estimate({**key, "repeats": 1}) is None
    changed = {**params, "logistic": {"C": 123.0}}
    assert stored_estimate(cv_key(file_sha256(DEFAULT_DATA), 42, 0.2, 8000, False, changed, 5, 3)) is None


# ---------------------------------------------------------------- tuned hyperparameters


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"xgboost": {"booster": "dart"}}, "not tunable"),
        ({"lightgbm": {"zero_as_missing": True}}, "not tunable"),
        ({"random_forest": {"class_weight": "balanced"}}, "not tunable"),
        ({"knn": {}}, "unknown learner"),
    ],
)
def test_params_outside_what_the_compiler_reproduces_are_refused(params, error):
    with pytest.raises(ValueError, match=error):
        resolve_params(params)


def test_committed_params_are_valid_and_fast_mode_only_shrinks_the_trees():
    params = read_json(PARAMS_FILE)["params"]
    assert set(params) <= set(BASE_LEARNERS)
    for name, p in params.items():
        assert set(p) <= TUNABLE[name]
    fast = resolve_params(params, fast=True)
    full = resolve_params(params)
    sizes = ("n_estimators", "max_depth")
    for name in ("random_forest", "gradient_boosting", "xgboost", "lightgbm"):
        assert fast[name]["n_estimators"] == min(full[name]["n_estimators"], FAST_TREES)
        if "max_depth" in full[name]:
            assert fast[name]["max_depth"] == min(full[name]["max_depth"], FAST_DEPTH)
        assert {k: v for k, v in fast[name].items() if k not in sizes} == {
            k: v for k, v in full[name].items() if k not in sizes
        }
