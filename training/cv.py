"""Honest estimates: repeated stratified k-fold cross-validation of the stack and of every base
learner, on the development part of the data (train + validation; never the test split).

    python -m training.cv [--folds 5] [--repeats 3] [--seed 42]   # writes training/cross_validation.json

Each fold fits the whole stacking pipeline once; its base learners (fitted on all of the fold's
training rows, exactly as each would be fitted alone) are scored on the same held-out rows, so
every learner is measured on identical folds and the stack-minus-best differences are paired.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold, cross_val_predict

from models.ensemble import BASE_LEARNERS, build_pipeline, resolve_params
from models.schema import FEATURE_NAMES, TARGET
from training.data import DEFAULT_DATA, development_part, file_sha256, load_data, stratify_split
from training.evaluate import HIGHER_IS_BETTER, LEARNERS, PROBABILITY_METRICS, cv_table, score_probabilities
from training.records import CV_FILE, command_line, load_params, pipeline_sha256, provenance, read_json, write_json


def numerics_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics the estimate depends on (module versions: the
    XGBoost distribution is xgboost-cpu on Linux, xgboost elsewhere)."""
    import lightgbm
    import sklearn
    import xgboost

    return {
        "scikit-learn": sklearn.__version__,
        "xgboost": xgboost.__version__,
        "lightgbm": lightgbm.__version__,
        "numpy": np.__version__,
    }


def cv_key(
    data_sha256: str, seed: int, test_size: float, rows: int, fast: bool, params, folds: int, repeats: int
) -> dict:
    """What an estimate was measured on: training uses a stored estimate only if this matches
    (the data, the split, the CV scheme, the whole unfitted pipeline and the library versions)."""
    return {
        "data_sha256": data_sha256,
        "seed": seed,
        "test_size": test_size,
        "rows": rows,
        "folds": folds,
        "repeats": repeats,
        "pipeline_sha256": pipeline_sha256(build_pipeline(seed, fast, params=params)),
        "libraries": numerics_versions(),
    }


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def _paired(stack: list[float], best: list[float], metric: str, test_share: float) -> dict[str, Any]:
    """stack - best per fold: mean, std, and the Nadeau-Bengio corrected standard error (folds of
    repeated CV share training rows, so the naive std / sqrt(n) is too optimistic)."""
    d = np.asarray(stack) - np.asarray(best)
    n = len(d)
    var = float(d.var(ddof=1)) if n > 1 else 0.0
    corrected_se = float(np.sqrt((1 / n + test_share / (1 - test_share)) * var))
    better = d > 0 if HIGHER_IS_BETTER[metric] else d < 0
    return {
        "mean": float(d.mean()),
        "std": float(np.sqrt(var)),
        "corrected_se": corrected_se,
        "stack_better_folds": int(better.sum()),
        "folds": n,
    }


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def calibration_summary(y: np.ndarray, p: np.ndarray, seed: int) -> dict[str, float]:
    """How well out-of-fold probabilities are calibrated, and what recalibration would buy.

    Calibration slope and intercept are those of a logistic fit of y on logit(p) (1 and 0 when
    calibrated). `brier_platt` / `brier_isotonic` are the Brier scores after Platt scaling or
    isotonic regression fitted on other rows (5-fold cross-fitting), so they show an honest
    gain rather than the calibrator's fit to its own rows.
    """
    z = _logit(p).reshape(-1, 1)
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(z, y)
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    platt = cross_val_predict(LogisticRegression(C=1e6, max_iter=1000), z, y, cv=cv, method="predict_proba")[:, 1]
    iso = cross_val_predict(IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1), p, y, cv=cv)
    bins = np.quantile(p, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(bins, p, side="right") - 1, 0, 9)
    ece = sum(
        abs(y[which == b].mean() - p[which == b].mean()) * (which == b).mean() for b in range(10) if (which == b).any()
    )
    return {
        "slope": float(fit.coef_[0, 0]),
        "intercept": float(fit.intercept_[0]),
        "expected_calibration_error": float(ece),
        "brier": float(np.mean((p - y) ** 2)),
        "brier_platt": float(np.mean((platt - y) ** 2)),
        "brier_isotonic": float(np.mean((iso - y) ** 2)),
    }


def cross_validate(
    X: pd.DataFrame,
    y: pd.Series,
    *,
    seed: int,
    fast: bool = False,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    folds: int = 5,
    repeats: int = 3,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Repeated stratified k-fold estimates (mean, std over folds) of ROC AUC, PR AUC and Brier
    for the stack and each base learner, the paired stack-minus-best-learner difference, and the
    calibration of the stack's out-of-fold probabilities (averaged over repeats)."""
    start = time.perf_counter()
    y_arr = np.asarray(y)
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    scores: dict[str, dict[str, list[float]]] = {m: {n: [] for n in LEARNERS} for m in PROBABILITY_METRICS}
    oof = np.full((repeats, len(X)), np.nan)
    total = folds * repeats
    for k, (fit_idx, held_idx) in enumerate(splitter.split(X, y_arr)):
        t0 = time.perf_counter()
        pipeline = build_pipeline(seed, fast, params=params).fit(X.iloc[fit_idx], y_arr[fit_idx])
        held = X.iloc[held_idx]
        proba = {"stack": pipeline.predict_proba(held)[:, 1]}
        features = pipeline.named_steps["prep"].transform(held)
        for name, est in pipeline.named_steps["stack"].named_estimators_.items():
            proba[name] = est.predict_proba(features)[:, 1]
        oof[k // folds, held_idx] = proba["stack"]
        for name, p in proba.items():
            for metric, value in score_probabilities(y_arr[held_idx], p).items():
                scores[metric][name].append(value)
        best_here = max(BASE_LEARNERS, key=lambda n: scores["roc_auc"][n][-1])
        progress(
            f"  fold {k + 1:>2}/{total}  ROC AUC stack {scores['roc_auc']['stack'][-1]:.4f}, "
            f"best learner {best_here} {scores['roc_auc'][best_here][-1]:.4f}  ({time.perf_counter() - t0:.1f}s)"
        )

    result: dict[str, Any] = {m: {n: _summary(v) for n, v in by_learner.items()} for m, by_learner in scores.items()}
    best = max(BASE_LEARNERS, key=lambda n: result["roc_auc"][n]["mean"])
    result["stack_minus_best"] = {
        "learner": best,
        **{m: _paired(scores[m]["stack"], scores[m][best], m, 1 / folds) for m in PROBABILITY_METRICS},
    }
    per_repeat = [calibration_summary(y_arr, oof[r], seed) for r in range(repeats)]
    result["stack_calibration"] = {k: float(np.mean([c[k] for c in per_repeat])) for k in per_repeat[0]}
    result["scheme"] = {
        "method": f"{repeats}x repeated stratified {folds}-fold cross-validation",
        "data": "development part: train + validation rows (the test split is never used)",
        "folds": folds,
        "repeats": repeats,
        "rows": len(X),
        "seed": seed,
        "fast": fast,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.cv", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fast", action="store_true", help="small learners (smoke runs)")
    p.add_argument("--default-params", action="store_true", help="measure the untuned defaults (not stored)")
    p.add_argument("--no-write", dest="write", action="store_false", help="print only; keep the stored file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    params = {} if a.default_params else load_params()
    df = load_data(a.data)
    # The validation share does not matter here: the development part is everything but the test split.
    dev = development_part(stratify_split(df, a.test_size, 0.16, a.seed))
    X, y = dev[list(FEATURE_NAMES)], dev[TARGET]
    resolved = resolve_params(params, a.fast)
    print(f"cross-validating on {len(X)} development rows ({a.repeats}x{a.folds} folds, seed {a.seed})")
    cv = cross_validate(X, y, seed=a.seed, fast=a.fast, params=params, folds=a.folds, repeats=a.repeats)
    print()
    print(cv_table(cv))
    print(f"\n{cv['scheme']['seconds']:.0f}s")
    if a.write and not a.default_params:
        key = cv_key(file_sha256(a.data), a.seed, a.test_size, len(X), a.fast, params, a.folds, a.repeats)
        record = {
            "provenance": provenance(command_line("training.cv", argv)),
            "key": key,
            "params": resolved,
            "estimate": cv,
        }
        print(f"wrote {write_json(CV_FILE, record)}")
    return 0


def stored_estimate(key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The committed estimate when it was measured for exactly `key`, else None."""
    record = read_json(CV_FILE)
    if record is None or record["key"] != dict(key):
        return None
    return {**record["estimate"], "source": {"file": CV_FILE.name, **record["provenance"]}}


if __name__ == "__main__":
    sys.exit(main())
