"""Fit the stacking pipeline, reporting each base learner's full fit and every fold."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.pipeline import Pipeline
from sklearn.utils import Bunch

from models.ensemble import build_base_learners, build_pipeline

# StackingClassifier clones (deep-copies) its estimators, so progress state cannot live on
# them; fits run sequentially (n_jobs=1) in this process, so a module-level listener is safe.
_listener: Callable[[str, float, int], None] | None = None


class _Timed(ClassifierMixin, BaseEstimator):
    """Fit-time wrapper that reports how long its estimator took. Removed after fitting,
    so the saved artifact contains only the plain scikit-learn/XGBoost/LightGBM learners."""

    def __init__(self, estimator=None, name: str = ""):
        self.estimator = estimator
        self.name = name

    def fit(self, X, y, **fit_params):
        start = time.perf_counter()
        self.estimator_ = clone(self.estimator).fit(X, y, **fit_params)
        self.classes_ = self.estimator_.classes_
        if _listener is not None:
            _listener(self.name, time.perf_counter() - start, len(X))
        return self

    def predict_proba(self, X):
        return self.estimator_.predict_proba(X)

    def predict(self, X):
        return self.estimator_.predict(X)


class _Capture(ClassifierMixin, BaseEstimator):
    """Fit-time wrapper of the meta-learner that keeps what it was fitted on: the base
    learners' out-of-fold probabilities (StackingClassifier's cross_val_predict). Removed after
    fitting, like _Timed."""

    def __init__(self, estimator=None):
        self.estimator = estimator

    def fit(self, X, y, **fit_params):
        self.estimator_ = clone(self.estimator).fit(X, y, **fit_params)
        self.classes_ = self.estimator_.classes_
        self.X_meta_ = np.asarray(X)
        return self

    def predict_proba(self, X):
        return self.estimator_.predict_proba(X)

    def predict(self, X):
        return self.estimator_.predict(X)


class Fitted(NamedTuple):
    pipeline: Pipeline
    out_of_fold: np.ndarray  # P(churn) of each training row from learners that did not see it


def _unwrap(pipeline: Pipeline) -> tuple[Pipeline, np.ndarray]:
    stack = pipeline.named_steps["stack"]
    capture = stack.final_estimator_
    # The stack's own out-of-fold predictions, the way it was trained: its meta-learner applied
    # to the out-of-fold probabilities of base learners fitted without each row.
    out_of_fold = capture.estimator_.predict_proba(capture.X_meta_)[:, 1]
    stack.final_estimator_ = capture.estimator_
    stack.final_estimator = capture.estimator
    stack.estimators_ = [w.estimator_ for w in stack.estimators_]
    stack.named_estimators_ = Bunch(
        **{name: est for (name, _), est in zip(stack.estimators, stack.estimators_, strict=False)}
    )
    stack.estimators = [(name, w.estimator) for name, w in stack.estimators]
    return pipeline, out_of_fold


def fit_pipeline(
    X: pd.DataFrame,
    y: pd.Series,
    seed: int,
    fast: bool = False,
    progress: Callable[[str], None] = print,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> Fitted:
    """Fit the ensemble on X, y with the default hyperparameters overridden by `params`, and
    keep its out-of-fold predictions of X (the drift reference's predictions); `progress`
    receives one line per learner fit and fold."""
    global _listener
    learners = [(name, _Timed(est, name)) for name, est in build_base_learners(seed, fast, params)]
    pipeline = build_pipeline(seed, fast, base_learners=learners)
    stack = pipeline.named_steps["stack"]
    stack.final_estimator = _Capture(stack.final_estimator)
    folds = pipeline.named_steps["stack"].cv.get_n_splits()
    seen: Counter[str] = Counter()

    def report(name: str, seconds: float, n_rows: int) -> None:
        seen[name] += 1
        # StackingClassifier fits every learner on all rows first, then once per fold.
        what = "full fit" if seen[name] == 1 else f"fold {seen[name] - 1}/{folds}"
        progress(f"  {name:<18} {what:<10} {n_rows:>6} rows  {seconds:6.2f}s")

    _listener = report
    try:
        pipeline.fit(X, y)
    finally:
        _listener = None
    return Fitted(*_unwrap(pipeline))
