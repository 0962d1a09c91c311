"""The drift reference training stores with the model: the fit split's features and target
with the stack's out-of-fold predictions (what the monitoring jobs compare traffic against)."""

from __future__ import annotations

import io

import pandas as pd
from sklearn.metrics import roc_auc_score

from models.schema import FEATURE_NAMES, TARGET
from models.store import REFERENCE_FILE, load_bundle


def test_the_reference_is_a_checked_file_of_the_model_entry(trained):
    bundle = load_bundle(trained.model, need=(REFERENCE_FILE,))  # verified against its SHA-256
    assert REFERENCE_FILE in bundle.metadata["files"]
    reference = pd.read_csv(io.BytesIO(bundle.files[REFERENCE_FILE]))
    assert list(reference.columns) == [*FEATURE_NAMES, TARGET, "churn_probability"]
    train = trained.splits.train.reset_index(drop=True)
    assert len(reference) == len(train) == bundle.metadata["reference"]["rows"]
    pd.testing.assert_frame_equal(reference[list(FEATURE_NAMES)], train[list(FEATURE_NAMES)], check_dtype=False)
    assert (reference[TARGET] == train[TARGET]).all()


def test_reference_predictions_are_out_of_fold_not_in_sample(trained):
    bundle = load_bundle(trained.model, need=(REFERENCE_FILE,))
    reference = pd.read_csv(io.BytesIO(bundle.files[REFERENCE_FILE]))
    oof = reference["churn_probability"]
    assert oof.between(0, 1).all()
    in_sample = trained.pipeline.predict_proba(reference[list(FEATURE_NAMES)])[:, 1]
    auc_oof, auc_in = roc_auc_score(reference[TARGET], oof), roc_auc_score(reference[TARGET], in_sample)
    # The model scores rows it was fitted on better than new ones; out-of-fold predictions score
    # like the cross-validated estimate (new rows), which is what traffic will look like.
    assert auc_in > auc_oof
    cv = bundle.metadata["cross_validation"]["roc_auc"]["stack"]
    assert abs(auc_oof - cv["mean"]) < 3 * max(cv["std"], 0.005), (auc_oof, cv)
