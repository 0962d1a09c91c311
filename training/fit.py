"""Fit the stacking pipeline, reporting each base learner's full fit and every fold."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

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


def _unwrap(pipeline: Pipeline) -> Pipeline:
    stack = pipeline.named_steps["stack"]
    stack.estimators_ = [w.estimator_ for w in stack.estimators_]
    stack.named_estimators_ = Bunch(
        **{name: est for (name, _), est in zip(stack.estimators, stack.estimators_, strict=False)}
    )
    stack.estimators = [(name, w.estimator) for name, w in stack.estimators]
    return pipeline


def fit_pipeline(
    X: pd.DataFrame,
    y: pd.Series,
    seed: int,
    fast: bool = False,
    progress: Callable[[str], None] = print,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> Pipeline:
    """Fit the ensemble on X, y with the default hyperparameters overridden by `params`;
    `progress` receives one line per learner fit and fold."""
    global _listener
    learners = [(name, _Timed(est, name)) for name, est in build_base_learners(seed, fast, params)]
    pipeline = build_pipeline(seed, fast, base_learners=learners)
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
    return _unwrap(pipeline)
