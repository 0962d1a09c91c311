"""Held-out evaluation: threshold choice on validation data, metrics on the test split,
and the report (JSON, Markdown, ROC / precision-recall / calibration plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.pipeline import Pipeline

THRESHOLD_RULE = (
    "maximise F1 on the validation split (16% of rows, never fitted on), placed midway below the "
    "winning probability so no validation customer sits exactly on it; the test split plays no part"
)


def churn_proba(pipeline: Pipeline, X: pd.DataFrame) -> np.ndarray:
    return pipeline.predict_proba(X)[:, 1]


def choose_threshold(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Threshold that maximises F1 on validation data (ties: the lowest threshold).

    Returned as the midpoint between the winning probability and the next lower distinct
    one: the same validation decisions, but no customer sits exactly on the threshold, so a
    last-bit difference between backends cannot flip a decision.
    """
    precision, recall, thresholds = precision_recall_curve(y_true, proba)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last point has no threshold
    chosen = float(thresholds[best])
    lower = proba[proba < chosen]
    return (chosen + float(lower.max())) / 2 if lower.size else chosen


def metrics_at(y_true: np.ndarray, proba: np.ndarray, threshold: float) -> dict[str, float]:
    decision = proba >= threshold
    return {
        "roc_auc": float(roc_auc_score(y_true, proba)),
        "pr_auc": float(average_precision_score(y_true, proba)),
        "brier": float(brier_score_loss(y_true, proba)),
        "precision": float(precision_score(y_true, decision, zero_division=0)),
        "recall": float(recall_score(y_true, decision, zero_division=0)),
        "f1": float(f1_score(y_true, decision, zero_division=0)),
        "positive_rate": float(decision.mean()),
    }


def base_learner_auc(pipeline: Pipeline, X: pd.DataFrame, y: np.ndarray) -> dict[str, float]:
    """ROC AUC of each fitted base learner on the same rows, beside the stack's."""
    features = pipeline.named_steps["prep"].transform(X)
    stack = pipeline.named_steps["stack"]
    return {
        name: float(roc_auc_score(y, est.predict_proba(features)[:, 1]))
        for name, est in stack.named_estimators_.items()
    }


def evaluate(pipeline: Pipeline, X_val, y_val, X_test, y_test) -> dict[str, Any]:
    threshold = choose_threshold(np.asarray(y_val), churn_proba(pipeline, X_val))
    proba = churn_proba(pipeline, X_test)
    test = metrics_at(np.asarray(y_test), proba, threshold)
    return {
        "threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "test": test,
        "base_learners_test_roc_auc": base_learner_auc(pipeline, X_test, np.asarray(y_test)),
        "_test_proba": proba,  # for the plots; not serialised
    }


def _plots(y_test: np.ndarray, proba: np.ndarray, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fpr, tpr, _ = roc_curve(y_test, proba)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"stack (AUC {roc_auc_score(y_test, proba):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test split")
    ax.legend(loc="lower right")
    fig.savefig(out / "roc.png", dpi=80, bbox_inches="tight")
    files.append("roc.png")

    precision, recall, _ = precision_recall_curve(y_test, proba)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision, label=f"stack (AP {average_precision_score(y_test, proba):.3f})")
    ax.axhline(y_test.mean(), ls="--", color="grey", label="base rate")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, test split")
    ax.legend()
    fig.savefig(out / "precision_recall.png", dpi=80, bbox_inches="tight")
    files.append("precision_recall.png")

    frac_pos, mean_pred = calibration_curve(y_test, proba, n_bins=10, strategy="quantile")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(mean_pred, frac_pos, "o-", label="stack")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.set(xlabel="mean predicted probability", ylabel="observed churn rate", title="Calibration, test split")
    ax.legend()
    fig.savefig(out / "calibration.png", dpi=80, bbox_inches="tight")
    files.append("calibration.png")
    plt.close("all")
    return files


def metrics_table(report: dict[str, Any]) -> str:
    """Markdown table of the test metrics and each base learner's ROC AUC."""
    t = report["evaluation"]["test"]
    lines = [
        "| metric (test split) | value |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in t.items()),
        f"| threshold | {report['evaluation']['threshold']:.4f} |",
        "",
        "| learner | test ROC AUC |",
        "|---|---|",
        f"| **stack** | **{t['roc_auc']:.4f}** |",
        *(f"| {k} | {v:.4f} |" for k, v in report["evaluation"]["base_learners_test_roc_auc"].items()),
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], y_test: np.ndarray, proba: np.ndarray, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(np.asarray(y_test), proba, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    md = [
        f"# Training report: {report['model_tag']}",
        "",
        f"Data: `{report['data']['path']}` ({report['data']['rows']} rows, sha256 `{report['data']['sha256'][:16]}…`); "
        f"split train/validation/test = {report['data']['train_rows']}/{report['data']['validation_rows']}/"
        f"{report['data']['test_rows']} (stratified, seed {report['seed']}); fast mode: {report['fast']}.",
        "",
        f"Decision threshold: {report['evaluation']['threshold']:.4f}: {report['evaluation']['threshold_rule']}.",
        "",
        metrics_table(report),
        "",
        *(f"![{p}]({p})" for p in plots),
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    return out
