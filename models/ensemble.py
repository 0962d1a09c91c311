"""The stacking ensemble: preprocessing and all learners in one scikit-learn Pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from lightgbm import LGBMClassifier
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier, StackingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from xgboost import XGBClassifier

from models.schema import BY_NAME, CATEGORICAL_FEATURES, NUMERIC_FEATURES

BASE_LEARNERS: tuple[str, ...] = ("random_forest", "gradient_boosting", "xgboost", "lightgbm", "logistic")

# The hand-picked hyperparameters the project started with (the untuned baseline). Tuned values
# (training/params.json, written by `python -m training.tune`) override them learner by learner.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "random_forest": {"n_estimators": 200, "max_depth": 10, "min_samples_leaf": 2},
    "gradient_boosting": {"n_estimators": 150, "max_depth": 3},
    "xgboost": {"n_estimators": 200, "max_depth": 4, "learning_rate": 0.05, "subsample": 0.9, "colsample_bytree": 0.9},
    "lightgbm": {"n_estimators": 200, "learning_rate": 0.05, "num_leaves": 15},
    "logistic": {"C": 1.0},
}

# The hyperparameters a params file may set: only options that change tree shapes, leaf values
# or coefficients, which training.onnx_export reproduces exactly. Options that change how a model
# predicts (categorical splits, LightGBM's zero_as_missing, linear trees, XGBoost's dart
# booster, class weights that un-normalise forest leaves) are left out on purpose.
TUNABLE: dict[str, frozenset[str]] = {
    "random_forest": frozenset(
        {
            "n_estimators",
            "max_depth",
            "min_samples_leaf",
            "min_samples_split",
            "max_features",
            "max_samples",
            "criterion",
        }
    ),
    "gradient_boosting": frozenset(
        {"n_estimators", "max_depth", "learning_rate", "subsample", "min_samples_leaf", "max_features"}
    ),
    "xgboost": frozenset(
        {
            "n_estimators",
            "max_depth",
            "learning_rate",
            "subsample",
            "colsample_bytree",
            "min_child_weight",
            "gamma",
            "reg_lambda",
            "reg_alpha",
        }
    ),
    "lightgbm": frozenset(
        {
            "n_estimators",
            "learning_rate",
            "num_leaves",
            "max_depth",
            "min_child_samples",
            "subsample",
            "subsample_freq",
            "colsample_bytree",
            "reg_lambda",
            "reg_alpha",
        }
    ),
    "logistic": frozenset({"C"}),
}

# Fast mode (tests, smoke runs): the same options with at most 20 trees per ensemble, at most 6
# deep (the forest's 10 would only make the test servers slower).
FAST_TREES = 20
FAST_DEPTH = 6
_FOLDS = {"full": 5, "fast": 3}


def resolve_params(params: Mapping[str, Mapping[str, Any]] | None = None, fast: bool = False) -> dict[str, dict]:
    """Each learner's hyperparameters: the defaults, overridden by `params` (e.g. tuned ones).

    Raises ValueError for an unknown learner or an option outside TUNABLE, so a hand-edited
    params file cannot bring in a learner option the exact compiler does not reproduce.
    """
    params = params or {}
    unknown = set(params) - set(BASE_LEARNERS)
    if unknown:
        raise ValueError(f"unknown learner(s) in params: {sorted(unknown)}")
    out: dict[str, dict] = {}
    for name in BASE_LEARNERS:
        extra = dict(params.get(name, {}))
        bad = set(extra) - TUNABLE[name]
        if bad:
            raise ValueError(f"{name}: option(s) {sorted(bad)} are not tunable (allowed: {sorted(TUNABLE[name])})")
        merged = {**DEFAULT_PARAMS[name], **extra}
        if fast and "n_estimators" in merged:
            merged["n_estimators"] = min(int(merged["n_estimators"]), FAST_TREES)
        if fast and "max_depth" in merged:
            merged["max_depth"] = min(int(merged["max_depth"]), FAST_DEPTH)
        out[name] = merged
    return out


def build_learner(name: str, params: Mapping[str, Any], seed: int) -> Any:
    """One unfitted base learner with the given hyperparameters, pinned to one thread so a
    1-CPU pod is not oversubscribed, and seeded."""
    p = dict(params)
    if name == "random_forest":
        return RandomForestClassifier(**p, n_jobs=1, random_state=seed)
    if name == "gradient_boosting":
        return GradientBoostingClassifier(**p, random_state=seed)
    if name == "xgboost":
        return XGBClassifier(**p, tree_method="hist", n_jobs=1, random_state=seed, eval_metric="logloss")
    if name == "lightgbm":
        return LGBMClassifier(**p, n_jobs=1, random_state=seed, deterministic=True, force_row_wise=True, verbose=-1)
    if name == "logistic":
        # Only the linear learner needs scaled inputs; trees are scale-invariant and see raw
        # values, which also keeps split thresholds exact for the compiled runtime.
        return Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression(**p, max_iter=1000))])
    raise ValueError(f"unknown learner {name!r}")


def build_base_learners(
    seed: int, fast: bool = False, params: Mapping[str, Mapping[str, Any]] | None = None
) -> list[tuple[str, object]]:
    """The five base learners with the default hyperparameters overridden by `params`."""
    return [(name, build_learner(name, p, seed)) for name, p in resolve_params(params, fast).items()]


class LogOdds(TransformerMixin, BaseEstimator):
    """log(p) - log(1 - p) of each column, with p clipped to [eps, 1 - eps] (a forest's
    probability can be exactly 0 or 1).

    The meta-learner sees the base learners' log-odds rather than their probabilities: a
    logistic regression on log-odds can reproduce any single learner exactly (weight 1, the
    rest 0) and pools them log-linearly, where on probabilities it cannot (measured: the stack's
    cross-validated Brier score went from worse than LightGBM's alone to better; see README).
    """

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def fit(self, X, y=None):
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X):
        # The compiled graph (training.onnx_export) evaluates exactly this: Clip, Log, Sub.
        p = np.clip(np.asarray(X, dtype=np.float64), self.eps, 1.0 - self.eps)
        return np.log(p) - np.log(1.0 - p)


def build_meta_learner() -> Pipeline:
    """The stack's final estimator: a logistic regression on the base learners' log-odds."""
    return Pipeline([("log_odds", LogOdds()), ("lr", LogisticRegression(max_iter=1000))])


def build_pipeline(
    seed: int = 42,
    fast: bool = False,
    base_learners: list | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> Pipeline:
    """Unfitted Pipeline: one-hot encoding of the categories, then the stacking classifier.

    The meta-learner is fitted on the log-odds of out-of-fold base-learner probabilities from
    stratified folds.
    """
    prep = ColumnTransformer(
        [
            ("num", "passthrough", list(NUMERIC_FEATURES)),
            (
                "cat",
                OneHotEncoder(
                    categories=[list(BY_NAME[c].categories) for c in CATEGORICAL_FEATURES],
                    handle_unknown="error",
                    sparse_output=False,
                ),
                list(CATEGORICAL_FEATURES),
            ),
        ],
        verbose_feature_names_out=False,
    )
    stack = StackingClassifier(
        estimators=base_learners or build_base_learners(seed, fast, params),
        final_estimator=build_meta_learner(),
        cv=StratifiedKFold(n_splits=_FOLDS["fast" if fast else "full"], shuffle=True, random_state=seed),
        stack_method="predict_proba",
        n_jobs=1,
    )
    return Pipeline([("prep", prep), ("stack", stack)])
