"""Training through the real code path: fit, evaluate, save, load back from the store."""

from __future__ import annotations

import bentoml
import numpy as np
import pytest

from models.ensemble import BASE_LEARNERS
from models.schema import FEATURE_NAMES, schema_dict
from models.store import PIPELINE_FILE, get_stored, load_bundle
from training.pipeline import TrainConfig, train


def test_progress_reports_every_learner_and_fold(trained):
    log = "\n".join(trained.log)
    for stage in ("[load]", "[fit]", "[evaluate]", "[compile]", "[save]"):
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


@pytest.mark.parametrize("fast", [True])
def test_fit_on_a_small_sample(fast, tmp_path):
    result = train(TrainConfig(fast=fast, sample=1500, compile=False, report_dir=tmp_path), log=lambda _: None)
    assert result.report["data"]["rows"] == 1500
    for name in ("report.json", "report.md", "roc.png", "precision_recall.png", "calibration.png"):
        assert (tmp_path / name).stat().st_size > 0
