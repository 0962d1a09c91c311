"""Tuned learners: each base learner's hyperparameters searched inside cross-validation with
Optuna (TPE sampler, median pruning) under a time budget, written to training/params.json,
then the cross-validated estimate of the tuned stack (training/cross_validation.json).

    nice -n 10 python -m training.tune [--budget-seconds 300] [--folds 5] [--seed 42] [--no-cv]

`python -m training` reads params.json, so the default training stays fast and deterministic;
a search bounded by time is not reproducible trial for trial, which is why its result is a
committed file. The search sees only the development rows (train + validation), never the test
split, and its folds are drawn with a different seed from the estimate's, so the estimate is
not scored on the partition the search chose by (it is not nested CV: the same rows chose the
hyperparameters, so it keeps a small optimistic selection bias; the untouched test split is
the unbiased check).

Two budgets bound the search. Serving: the compiled graph evaluates every tree for every row,
so a learner's trees x depth (tree_work) may be at most SERVING_BUDGET times the hand-picked
model's, which keeps the served model's latency and throughput; costlier trials are rejected
before they are fitted. Training: a trial whose first fit on 6,400 rows takes more CPU time
than FIT_SECONDS_CAP is dropped, so the tuned stack still trains within `python -m training`'s
60 s.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import numpy as np
import optuna
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from models.ensemble import BASE_LEARNERS, DEFAULT_PARAMS, build_learner, build_pipeline, resolve_params
from models.schema import FEATURE_NAMES, TARGET
from training.data import DEFAULT_DATA, development_part, file_sha256, load_data, stratify_split
from training.records import PARAMS_FILE, command_line, provenance, write_json


def _random_forest(t: optuna.Trial) -> dict[str, Any]:
    return {
        "n_estimators": t.suggest_int("n_estimators", 100, 300, step=25),
        "max_depth": t.suggest_int("max_depth", 6, 14),
        "min_samples_leaf": t.suggest_int("min_samples_leaf", 1, 30, log=True),
        "max_features": t.suggest_categorical("max_features", ["sqrt", 0.5]),
    }


def _gradient_boosting(t: optuna.Trial) -> dict[str, Any]:
    return {
        "n_estimators": t.suggest_int("n_estimators", 50, 400, step=25),
        "learning_rate": t.suggest_float("learning_rate", 0.01, 0.3, log=True),
        "max_depth": t.suggest_int("max_depth", 2, 5),
        "subsample": t.suggest_float("subsample", 0.5, 1.0),
        "min_samples_leaf": t.suggest_int("min_samples_leaf", 1, 50, log=True),
    }


def _xgboost(t: optuna.Trial) -> dict[str, Any]:
    return {
        "n_estimators": t.suggest_int("n_estimators", 100, 500, step=50),
        "max_depth": t.suggest_int("max_depth", 2, 6),
        "learning_rate": t.suggest_float("learning_rate", 0.01, 0.3, log=True),
        "subsample": t.suggest_float("subsample", 0.5, 1.0),
        "colsample_bytree": t.suggest_float("colsample_bytree", 0.5, 1.0),
        "min_child_weight": t.suggest_float("min_child_weight", 0.5, 20, log=True),
        "reg_lambda": t.suggest_float("reg_lambda", 0.1, 20, log=True),
    }


def _lightgbm(t: optuna.Trial) -> dict[str, Any]:
    return {
        "n_estimators": t.suggest_int("n_estimators", 100, 500, step=50),
        "learning_rate": t.suggest_float("learning_rate", 0.01, 0.3, log=True),
        "num_leaves": t.suggest_int("num_leaves", 4, 32),
        "min_child_samples": t.suggest_int("min_child_samples", 5, 100, log=True),
        "subsample": t.suggest_float("subsample", 0.5, 1.0),
        "subsample_freq": 1,  # bagging on every iteration (LightGBM ignores subsample when this is 0)
        "colsample_bytree": t.suggest_float("colsample_bytree", 0.5, 1.0),
        "reg_lambda": t.suggest_float("reg_lambda", 1e-3, 20, log=True),
    }


def _logistic(t: optuna.Trial) -> dict[str, Any]:
    return {"C": t.suggest_float("C", 1e-3, 100, log=True)}


SPACES: dict[str, Callable[[optuna.Trial], dict[str, Any]]] = {
    "random_forest": _random_forest,
    "gradient_boosting": _gradient_boosting,
    "xgboost": _xgboost,
    "lightgbm": _lightgbm,
    "logistic": _logistic,
}
# A learner's trees x depth may grow to this multiple of the hand-picked model's (see tree_work).
SERVING_BUDGET = 1.25


def tree_work(name: str, params: dict[str, Any]) -> float:
    """Tree nodes the compiled graph visits per row, at most: trees x depth (for LightGBM, whose
    trees grow leaf-wise under a leaf count, the depth of a balanced tree with that many leaves);
    0 for the linear learner."""
    if name == "logistic":
        return 0.0
    depth = math.ceil(math.log2(params["num_leaves"])) if name == "lightgbm" else params["max_depth"]
    return float(params["n_estimators"] * depth)


# CPU seconds for one fit on a fold's training rows (6,400 with 5 folds of 8,000): the stack fits each
# learner 6 times (all rows + 5 folds), so these keep its fit within about 6 x 7 CPU s.
# (The defaults take about 2.0 / 2.1 / 0.3 / 0.25 / 0.05 CPU s here, on a shared machine.)
FIT_SECONDS_CAP = {"random_forest": 2.2, "gradient_boosting": 2.2, "xgboost": 0.6, "lightgbm": 0.6, "logistic": 0.3}
# Share of the time budget per learner: the slow learners get more, the linear one hardly any.
BUDGET_SHARE = {"random_forest": 0.2, "gradient_boosting": 0.3, "xgboost": 0.2, "lightgbm": 0.25, "logistic": 0.05}
MAX_TRIALS = 200


class _TooSlow(optuna.TrialPruned):
    """The trial's first fit broke the training-time cap."""


class _TooCostly(optuna.TrialPruned):
    """The trial's trees would break the serving budget (rejected before fitting)."""


def _cv_auc(name: str, params: dict, X: np.ndarray, y: np.ndarray, folds: list, seed: int, trial=None) -> float:
    """Mean ROC AUC of one learner over the folds; reports each fold to the pruner."""
    aucs = []
    for k, (fit_idx, held_idx) in enumerate(folds):
        # CPU time, not wall time: the cap must not depend on what else the machine is running.
        t0 = time.process_time()
        est = build_learner(name, params, seed).fit(X[fit_idx], y[fit_idx])
        seconds = time.process_time() - t0
        if trial is not None and k == 0 and seconds > FIT_SECONDS_CAP[name]:
            trial.set_user_attr("fit_seconds", seconds)
            raise _TooSlow()
        aucs.append(roc_auc_score(y[held_idx], est.predict_proba(X[held_idx])[:, 1]))
        if trial is not None:
            trial.report(float(np.mean(aucs)), k)
            if trial.should_prune():
                raise optuna.TrialPruned()
    return float(np.mean(aucs))


def tune_learner(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    folds: list,
    seed: int,
    budget_seconds: float,
    max_trials: int = MAX_TRIALS,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Search one learner's hyperparameters; returns (chosen params, a summary of the search).

    The untuned defaults are scored on the same folds first, and kept unless a trial beats them.
    """
    t0 = time.perf_counter()
    default_auc = _cv_auc(name, DEFAULT_PARAMS[name], X, y, folds, seed)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
    )
    space = SPACES[name]
    serving_cap = SERVING_BUDGET * tree_work(name, resolve_params({})[name])

    def objective(trial: optuna.Trial) -> float:
        params = space(trial)
        if tree_work(name, params) > serving_cap:
            trial.set_user_attr("tree_work", tree_work(name, params))
            raise _TooCostly()
        return _cv_auc(name, params, X, y, folds, seed, trial)

    remaining = max(budget_seconds - (time.perf_counter() - t0), 1.0)
    study.optimize(objective, n_trials=max_trials, timeout=remaining)
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    too_slow = sum(1 for t in study.trials if "fit_seconds" in t.user_attrs)
    too_costly = sum(1 for t in study.trials if "tree_work" in t.user_attrs)
    best_auc = study.best_value if complete else float("-inf")
    tuned = best_auc > default_auc
    chosen = space(optuna.trial.FixedTrial(study.best_params)) if tuned else dict(DEFAULT_PARAMS[name])
    summary = {
        "trials": len(study.trials),
        "completed": len(complete),
        "pruned": int(sum(s == optuna.trial.TrialState.PRUNED for s in states)) - too_slow - too_costly,
        "too_slow": too_slow,
        "too_costly_to_serve": too_costly,
        "tree_work": tree_work(name, chosen),
        "tree_work_cap": serving_cap,
        "seconds": round(time.perf_counter() - t0, 1),
        "default_roc_auc": default_auc,
        "best_roc_auc": max(best_auc, default_auc),
        "chosen": "tuned" if tuned else "defaults (no trial beat them)",
    }
    log(
        f"  {name:<18} {summary['trials']:>3} trials ({summary['pruned']} pruned, {too_slow} too slow, "
        f"{too_costly} too costly to serve) in "
        f"{summary['seconds']:.0f}s: CV ROC AUC {default_auc:.4f} (defaults) -> {summary['best_roc_auc']:.4f}"
    )
    return chosen, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--folds", type=int, default=5, help="folds of the search's cross-validation")
    p.add_argument("--budget-seconds", type=float, default=300, help="time for the whole search (default 300)")
    p.add_argument("--no-cv", dest="cv", action="store_false", help="skip the 5x3 estimate of the tuned stack")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    df = load_data(a.data)
    dev = development_part(stratify_split(df, a.test_size, 0.16, a.seed))
    # The one-hot encoding has fixed categories: fitting it on all development rows leaks nothing.
    prep = build_pipeline(a.seed).named_steps["prep"].fit(dev[list(FEATURE_NAMES)])
    X, y = prep.transform(dev[list(FEATURE_NAMES)]), dev[TARGET].to_numpy()
    # A different seed from the estimate's folds (training.cv uses a.seed).
    fold_seed = a.seed + 1
    folds = list(StratifiedKFold(n_splits=a.folds, shuffle=True, random_state=fold_seed).split(X, y))
    print(
        f"tuning on {len(X)} development rows, {a.folds}-fold CV (fold seed {fold_seed}), budget {a.budget_seconds:g}s"
    )
    params, learners = {}, {}
    for name in BASE_LEARNERS:
        params[name], learners[name] = tune_learner(name, X, y, folds, a.seed, a.budget_seconds * BUDGET_SHARE[name])
    record = {
        "provenance": provenance(command_line("training.tune", argv)),
        "data": {"sha256": file_sha256(a.data), "rows": len(X), "seed": a.seed, "test_size": a.test_size},
        "search": {
            "library": f"optuna {version('optuna')}: TPE sampler (seed {a.seed}), median pruner",
            "objective": f"mean ROC AUC over {a.folds} stratified folds of the development rows (fold seed {fold_seed})",
            "budget_seconds": a.budget_seconds,
            "seconds": round(time.perf_counter() - start, 1),
            "fit_cpu_seconds_cap": FIT_SECONDS_CAP,
            "serving_budget": f"trees x depth at most {SERVING_BUDGET:g}x the hand-picked model's",
            "learners": learners,
        },
        "params": params,
    }
    print(f"wrote {write_json(PARAMS_FILE, record)}")
    print("chosen:", resolve_params(params))
    if a.cv:
        from training import cv

        # The same data and split; options left at their defaults stay off the recorded command.
        defaults = vars(parse_args([]))
        cv_argv = [
            x
            for name in ("data", "seed", "test_size")
            if vars(a)[name] != defaults[name]
            for x in (f"--{name.replace('_', '-')}", str(vars(a)[name]))
        ]
        cv.main(cv_argv)
    print(f"tuning command: {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
