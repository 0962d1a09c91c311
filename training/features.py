"""Feature ideas that are common on this dataset, screened by cross-validation before any of
them may enter the model (and with it the compiled graph):

    nice -n 10 python -m training.features [--folds 5] [--repeats 2]   # writes reports/training/features.md

Each idea is added to the model's inputs and every base learner is scored on the same repeated
folds of the development rows, with and without it; the table gives the paired difference in
ROC AUC. None of these features is in the served model unless this screening supports it (see
the README for the decision and the figures).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold

from models.ensemble import BASE_LEARNERS, build_learner, build_meta_learner, build_pipeline, resolve_params
from models.schema import FEATURE_NAMES, TARGET
from training.data import DEFAULT_DATA, development_part, load_data, stratify_split
from training.groups import AGE_BANDS
from training.records import command_line, load_params, provenance

REPORT = Path(__file__).resolve().parent.parent / "reports" / "training" / "features.md"


def zero_balance(frame: pd.DataFrame) -> np.ndarray:
    """1 for customers with no balance (about a third of them), else 0."""
    return (frame["Balance"].to_numpy() == 0).astype(float)[:, None]


def balance_salary_ratio(frame: pd.DataFrame) -> np.ndarray:
    """Balance / EstimatedSalary (salary floored at 1: the schema allows 0)."""
    return (frame["Balance"].to_numpy() / np.maximum(frame["EstimatedSalary"].to_numpy(), 1.0))[:, None]


def age_bands(frame: pd.DataFrame) -> np.ndarray:
    """One-hot age bands (training.groups.AGE_BANDS): a step function of age for the linear learner."""
    age = frame["Age"].to_numpy()
    edges = [lo for lo, _ in AGE_BANDS] + [np.inf]
    return np.stack([(age >= lo) & (age < hi) for lo, hi in itertools.pairwise(edges)], 1).astype(float)


def products_one_hot(frame: pd.DataFrame) -> np.ndarray:
    """NumOfProducts as categories (1, 2, 3, 4+): churn is U-shaped in it."""
    n = frame["NumOfProducts"].to_numpy()
    return np.stack([n == 1, n == 2, n == 3, n >= 4], 1).astype(float)


IDEAS: dict[str, Callable[[pd.DataFrame], np.ndarray]] = {
    "zero_balance": zero_balance,
    "balance_salary_ratio": balance_salary_ratio,
    "age_bands": age_bands,
    "products_one_hot": products_one_hot,
}


LINEAR_ONLY = "age_bands + products_one_hot, logistic learner only"


def _stack_proxy(oof: dict[str, np.ndarray], y: np.ndarray, held: np.ndarray) -> float:
    """ROC AUC on the `held` rows of the stack's meta-learner (models.ensemble.build_meta_learner)
    fitted on the other rows' out-of-fold probabilities: a cheap stand-in for refitting the whole
    stack (with its inner folds) per fold."""
    Z = np.column_stack([oof[n] for n in BASE_LEARNERS])
    fit = np.ones(len(y), bool)
    fit[held] = False
    meta = build_meta_learner().fit(Z[fit], y[fit])
    return float(roc_auc_score(y[held], meta.predict_proba(Z[held])[:, 1]))


def _paired(with_it: np.ndarray, without: np.ndarray, test_share: float) -> dict[str, float]:
    d = with_it - without
    se = float(np.sqrt((1 / len(d) + test_share / (1 - test_share)) * d.var(ddof=1))) if len(d) > 1 else 0.0
    return {"auc": float(with_it.mean()), "diff": float(d.mean()), "std": float(d.std(ddof=1)), "se": se}


def screen(
    frame: pd.DataFrame, y: np.ndarray, params: dict, seed: int, folds: int, repeats: int, log=print
) -> dict[str, dict[str, dict[str, float]]]:
    """Per idea (and all together), per learner and for a stack proxy: ROC AUC with the idea
    minus without it, paired over the same folds (mean, std, Nadeau-Bengio corrected SE)."""
    prep = build_pipeline(seed).named_steps["prep"].fit(frame)
    base = prep.transform(frame)
    variants = {"baseline": base, **{n: np.hstack([base, f(frame)]) for n, f in IDEAS.items()}}
    variants["all"] = np.hstack([base, *(f(frame) for f in IDEAS.values())])
    linear = np.hstack([base, age_bands(frame), products_one_hot(frame)])
    resolved = resolve_params(params)
    splits = list(RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed).split(base, y))
    auc = {v: {n: [] for n in BASE_LEARNERS} for v in [*variants, LINEAR_ONLY]}
    oof = {v: {n: np.zeros((repeats, len(y))) for n in BASE_LEARNERS} for v in [*variants, LINEAR_ONLY]}
    for k, (a, b) in enumerate(splits):
        t0 = time.perf_counter()
        for v, X in [*variants.items(), (LINEAR_ONLY, linear)]:
            for name in BASE_LEARNERS if v != LINEAR_ONLY else ("logistic",):
                est = build_learner(name, resolved[name], seed).fit(X[a], y[a])
                oof[v][name][k // folds, b] = est.predict_proba(X[b])[:, 1]
                auc[v][name].append(roc_auc_score(y[b], oof[v][name][k // folds, b]))
        log(f"  fold {k + 1}/{len(splits)} ({time.perf_counter() - t0:.0f}s)")
    for name in BASE_LEARNERS[:-1]:  # the linear-only variant keeps the trees' baseline inputs
        auc[LINEAR_ONLY][name], oof[LINEAR_ONLY][name] = auc["baseline"][name], oof["baseline"][name]
    for v in auc:
        auc[v]["stack (proxy)"] = [
            _stack_proxy({n: oof[v][n][k // folds] for n in BASE_LEARNERS}, y, held)
            for k, (_, held) in enumerate(splits)
        ]
    return {v: {n: _paired(np.array(auc[v][n]), np.array(auc["baseline"][n]), 1 / folds) for n in auc[v]} for v in auc}


def screening_table(result: dict) -> str:
    cols = list(result["baseline"])
    lines = [
        "| feature idea | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
        "| baseline ROC AUC | " + " | ".join(f"{result['baseline'][n]['auc']:.4f}" for n in cols) + " |",
    ]
    for v, by in result.items():
        if v != "baseline":
            cells = [f"{by[n]['diff']:+.4f} (SE {by[n]['se']:.4f})" for n in cols]
            lines.append(f"| + {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.features", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--default-params", action="store_true", help="screen with the untuned defaults")
    a = p.parse_args(argv)
    dev = development_part(stratify_split(load_data(DEFAULT_DATA), 0.2, 0.16, a.seed))
    frame, y = dev[list(FEATURE_NAMES)], dev[TARGET].to_numpy()
    params = {} if a.default_params else load_params()
    start = time.perf_counter()
    result = screen(frame, y, params, a.seed, a.folds, a.repeats)
    table = screening_table(result)
    prov = provenance(command_line("training.features", argv))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(
        "# Feature screening\n\n"
        f"`{prov['command']}` (commit {prov['commit']}, {prov['date']}, {prov['machine']}; "
        f"{time.perf_counter() - start:.0f} s). {a.repeats}x repeated stratified {a.folds}-fold CV on the "
        f"{len(frame)} development rows; each learner's ROC AUC with the idea minus without it on the same folds "
        f"(hyperparameters: {'defaults' if a.default_params else 'training/params.json'}). The stack column is a "
        "proxy: per fold, the meta-learner fitted on the other rows' out-of-fold learner probabilities.\n\n"
        + table
        + "\n"
    )
    print(table)
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
