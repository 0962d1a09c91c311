"""Held-out evaluation: thresholds chosen on validation data, the single final evaluation on
the test split (metrics, money, per-group behaviour, calibration) and the report (JSON,
Markdown, ROC / precision-recall / calibration / cumulative-gains / expected-value plots)."""

from __future__ import annotations

import json
from collections.abc import Mapping
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

from models.ensemble import BASE_LEARNERS
from training.decision import (
    CostModel,
    capture_rate,
    choose_ev_threshold,
    decision_summary,
    midpoint_below,
    value_curve,
)
from training.groups import GROUP_METRICS, group_gaps, group_metrics, largest_gap

LEARNERS: tuple[str, ...] = ("stack", *BASE_LEARNERS)  # the rows of cross-validation tables

PROBABILITY_METRICS: tuple[str, ...] = ("roc_auc", "pr_auc", "brier")
HIGHER_IS_BETTER = {"roc_auc": True, "pr_auc": True, "brier": False}
CAPTURE_SHARES: tuple[float, ...] = (0.1, 0.2)


def threshold_rule(cost: CostModel) -> str:
    return (
        f"maximise the expected value of retention offers on the validation split (16% of rows, never fitted "
        f"on): offer cost {cost.offer_cost:g}, value of a churner kept {cost.customer_value:g}; ties go to the "
        f"higher threshold; placed midway below the lowest offered probability so no validation customer sits "
        f"exactly on it; the test split plays no part"
    )


def churn_proba(pipeline: Pipeline, X: pd.DataFrame) -> np.ndarray:
    return pipeline.predict_proba(X)[:, 1]


def score_probabilities(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Threshold-free scores of churn probabilities: ROC AUC, PR AUC (average precision), Brier."""
    return {
        "roc_auc": float(roc_auc_score(y_true, proba)),
        "pr_auc": float(average_precision_score(y_true, proba)),
        "brier": float(brier_score_loss(y_true, proba)),
    }


def choose_threshold(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Threshold that maximises F1 on validation data (ties: the lowest threshold).

    Returned midway between the winning probability and the next lower distinct one
    (decision.midpoint_below): the same validation decisions, but no customer sits exactly on
    the threshold, so a last-bit difference between backends cannot flip a decision.
    """
    precision, recall, thresholds = precision_recall_curve(y_true, proba)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last point has no threshold
    return midpoint_below(float(thresholds[best]), np.asarray(proba))


def metrics_at(y_true: np.ndarray, proba: np.ndarray, threshold: float) -> dict[str, float]:
    decision = proba >= threshold
    return {
        **score_probabilities(y_true, proba),
        "precision": float(precision_score(y_true, decision, zero_division=0)),
        "recall": float(recall_score(y_true, decision, zero_division=0)),
        "f1": float(f1_score(y_true, decision, zero_division=0)),
        "positive_rate": float(decision.mean()),
    }


def base_learner_proba(pipeline: Pipeline, X: pd.DataFrame) -> dict[str, np.ndarray]:
    """P(churn) of each fitted base learner on the same rows, beside the stack's."""
    features = pipeline.named_steps["prep"].transform(X)
    stack = pipeline.named_steps["stack"]
    return {name: est.predict_proba(features)[:, 1] for name, est in stack.named_estimators_.items()}


def evaluate(pipeline: Pipeline, X_val, y_val, X_test, y_test, cost: CostModel | None = None) -> dict[str, Any]:
    """Choose both thresholds on validation; then the one evaluation of the test split."""
    cost = cost or CostModel()
    y_val, y_test = np.asarray(y_val), np.asarray(y_test)
    val_proba = churn_proba(pipeline, X_val)
    ev_threshold = choose_ev_threshold(y_val, val_proba, cost)
    f1_threshold = choose_threshold(y_val, val_proba)
    proba = churn_proba(pipeline, X_test)
    base = base_learner_proba(pipeline, X_test)
    test = metrics_at(y_test, proba, ev_threshold)
    at_test = decision_summary(y_test, proba, ev_threshold, cost)
    decision = {
        "offer_cost": cost.offer_cost,
        "customer_value": cost.customer_value,
        "break_even_probability": cost.break_even,
        "threshold": ev_threshold,
        "rule": threshold_rule(cost),
        # The test split: the honest figures. Validation is where the threshold was chosen.
        **{k: v for k, v in at_test.items() if k != "threshold"},
        "split": "test",
        "validation": decision_summary(y_val, val_proba, ev_threshold, cost),
        "f1_threshold": {
            "rule": "maximise F1 on the validation split",
            **decision_summary(y_test, proba, f1_threshold, cost),
            "f1": float(f1_score(y_test, proba >= f1_threshold, zero_division=0)),
        },
        "baselines": {
            "offer_everyone": cost.expected_value(y_test, np.ones(len(y_test), bool)),
            "offer_nobody": 0.0,
            "perfect_targeting": cost.expected_value(y_test, y_test == 1),
        },
        "capture_rate": {f"top_{round(s * 100)}_percent": capture_rate(y_test, proba, s) for s in CAPTURE_SHARES},
    }
    groups = group_metrics(X_test, y_test, proba, ev_threshold)
    gaps = group_gaps(groups)
    return {
        "threshold": ev_threshold,
        "threshold_rule": threshold_rule(cost),
        "test": test,
        "base_learners_test_roc_auc": {n: float(roc_auc_score(y_test, p)) for n, p in base.items()},
        "decision": decision,
        "group_metrics": groups,
        "group_gaps": gaps,
        "largest_group_gap": {m: largest_gap(gaps, m) for m in GROUP_METRICS},
        "test_brier": {
            "stack": test["brier"],
            **{n: float(brier_score_loss(y_test, p)) for n, p in base.items()},
        },
        # For the plots; not serialised.
        "_test_proba": proba,
        "_base_test_proba": base,
        "_val": (y_val, val_proba),
    }


def _plots(report: dict[str, Any], y_test: np.ndarray, proba: np.ndarray, base: dict, val, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig, name: str) -> None:
        fig.savefig(out / name, dpi=80, bbox_inches="tight")
        files.append(name)

    fpr, tpr, _ = roc_curve(y_test, proba)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"stack (AUC {roc_auc_score(y_test, proba):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test split")
    ax.legend(loc="lower right")
    save(fig, "roc.png")

    precision, recall, _ = precision_recall_curve(y_test, proba)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision, label=f"stack (AP {average_precision_score(y_test, proba):.3f})")
    ax.axhline(y_test.mean(), ls="--", color="grey", label="base rate")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, test split")
    ax.legend()
    save(fig, "precision_recall.png")

    # Reliability of every learner: the stack's meta-learner is itself a logistic calibration.
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, p in {"stack": proba, **base}.items():
        frac_pos, mean_pred = calibration_curve(y_test, p, n_bins=10, strategy="quantile")
        style = {"lw": 2.5, "color": "black"} if name == "stack" else {"lw": 1, "alpha": 0.8}
        ax.plot(mean_pred, frac_pos, "o-", ms=3, label=f"{name} (Brier {brier_score_loss(y_test, p):.4f})", **style)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.set(xlabel="mean predicted probability", ylabel="observed churn rate", title="Calibration, test split")
    ax.legend(fontsize=8)
    save(fig, "calibration.png")

    # Cumulative gains: share of churners reached when contacting the top x% by score.
    order = np.argsort(-proba, kind="stable")
    reached = np.r_[0, np.cumsum(y_test[order])] / y_test.sum()
    contacted = np.arange(len(y_test) + 1) / len(y_test)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(contacted, reached, label="stack")
    ax.plot([0, y_test.mean(), 1], [0, 1, 1], ":", color="green", label="perfect")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="random")
    for share, rate in zip(CAPTURE_SHARES, report["decision"]["capture_rate"].values(), strict=True):
        ax.plot([share], [rate], "o", color="C1")
        ax.annotate(f"top {share:.0%}: {rate:.0%}", (share, rate), textcoords="offset points", xytext=(8, -12))
    ax.set(
        xlabel="share of customers contacted", ylabel="share of churners reached", title="Cumulative gains, test split"
    )
    ax.legend(loc="lower right")
    save(fig, "gains.png")

    d = report["decision"]
    cost = CostModel(d["offer_cost"], d["customer_value"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (y, p) in {"validation": val, "test": (y_test, proba)}.items():
        levels, values = value_curve(y, p, cost)
        ax.plot(levels, values / len(y), label=label)
    ax.axvline(d["threshold"], color="C2", ls="--", label=f"expected-value threshold {d['threshold']:.3f}")
    ax.axvline(
        d["f1_threshold"]["threshold"], color="C3", ls=":", label=f"F1 threshold {d['f1_threshold']['threshold']:.3f}"
    )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(
        xlabel="threshold (offer when P(churn) >= threshold)",
        ylabel="expected value per customer",
        title=f"Expected value (offer {d['offer_cost']:g}, customer kept {d['customer_value']:g})",
    )
    ax.legend(fontsize=8)
    save(fig, "expected_value.png")
    plt.close("all")
    return files


def metrics_table(report: dict[str, Any]) -> str:
    """Markdown tables: test metrics; each learner's test ROC AUC and Brier beside its CV estimate."""
    ev = report["evaluation"]
    t = ev["test"]
    cv = report.get("cross_validation", {})

    def cv_cell(metric: str, name: str) -> str:
        if metric not in cv:
            return "–"
        return f"{cv[metric][name]['mean']:.4f} ± {cv[metric][name]['std']:.4f}"

    lines = [
        "| metric (test split) | value |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in t.items()),
        f"| threshold | {ev['threshold']:.4f} |",
        "",
        "| learner | test ROC AUC | CV ROC AUC (mean ± std) | test Brier | CV Brier |",
        "|---|---|---|---|---|",
        f"| **stack** | **{t['roc_auc']:.4f}** | {cv_cell('roc_auc', 'stack')} | {t['brier']:.4f} | "
        f"{cv_cell('brier', 'stack')} |",
        *(
            f"| {k} | {v:.4f} | {cv_cell('roc_auc', k)} | {ev['test_brier'][k]:.4f} | {cv_cell('brier', k)} |"
            for k, v in ev["base_learners_test_roc_auc"].items()
        ),
    ]
    return "\n".join(lines)


def decision_table(decision: dict[str, Any]) -> str:
    """Markdown table: the expected-value threshold beside the F1 threshold, on the test split."""
    f1 = decision["f1_threshold"]
    rows = [
        ("threshold", decision["threshold"], f1["threshold"], "{:.4f}"),
        ("expected value (test split)", decision["expected_value"], f1["expected_value"], "{:,.0f}"),
        (
            "expected value per customer",
            decision["expected_value_per_customer"],
            f1["expected_value_per_customer"],
            "{:.2f}",
        ),
        ("offers (share of customers)", decision["offer_rate"], f1["offer_rate"], "{:.1%}"),
        ("precision", decision["precision"], f1["precision"], "{:.3f}"),
        ("recall", decision["recall"], f1["recall"], "{:.3f}"),
    ]
    b, c = decision["baselines"], decision["capture_rate"]
    return "\n".join(
        [
            "| test split | expected-value threshold (served) | F1 threshold |",
            "|---|---|---|",
            *(f"| {name} | {fmt.format(a)} | {fmt.format(z)} |" for name, a, z, fmt in rows),
            "",
            f"Offer cost {decision['offer_cost']:g}, value of a churner kept {decision['customer_value']:g}: an offer "
            f"pays for itself above P(churn) = {decision['break_even_probability']:.3f} if the scores are calibrated. "
            f"Baselines on the test split: offer everyone {b['offer_everyone']:,.0f}, nobody 0, perfect targeting "
            f"{b['perfect_targeting']:,.0f}. On validation (where the threshold was chosen) the expected value is "
            f"{decision['validation']['expected_value']:,.0f}. Capture rate (share of churners among the top-scored "
            f"customers, test split): top 10% {c['top_10_percent']:.1%}, top 20% {c['top_20_percent']:.1%}.",
        ]
    )


def groups_table(groups: dict[str, Any], gaps: dict[str, Any]) -> str:
    """Markdown table of the per-group metrics and, per feature, the largest gap of each metric."""
    cols = ("count", "churn_rate", *GROUP_METRICS)
    lines = ["| feature | group | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for feature, by_group in groups.items():
        for group, m in by_group.items():
            cells = [str(m["count"]) if c == "count" else (f"{m[c]:.3f}" if c in m else "–") for c in cols]
            lines.append(f"| {feature} | {group} | " + " | ".join(cells) + " |")
        cells = [
            (f"**{gaps[feature][c]['gap']:.3f}**" if c in gaps[feature] else "–") if c in GROUP_METRICS else ""
            for c in cols
        ]
        lines.append(f"| {feature} | *largest gap* | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], y_test: np.ndarray, evaluation: dict[str, Any], out: Path) -> Path:
    """report.json, report.md and the plots in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(
        report, np.asarray(y_test), evaluation["_test_proba"], evaluation["_base_test_proba"], evaluation["_val"], out
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    cv, ev, data = report["cross_validation"], report["evaluation"], report["data"]
    scheme, cal = cv["scheme"], cv["stack_calibration"]
    source = cv.get("source")
    measured = (
        f"stored by `{source['command']}` (commit {source['commit']}, {source['date']}, {source['machine']})"
        if source
        else "measured during this training run"
    )
    big = ev["largest_group_gap"]
    md = [
        f"# Training report: {report['model_tag']}",
        "",
        f"Data: `{data['path']}` ({data['rows']} rows, sha256 `{data['sha256'][:16]}…`); "
        f"split train/validation/test = {data['train_rows']}/{data['validation_rows']}/"
        f"{data['test_rows']} (stratified, seed {report['seed']}); fast mode: {report['fast']}. "
        f"Hyperparameters: {report['tuning']['source']} (sha256 `{report['tuning']['params_sha256'][:12]}…`).",
        "",
        "## Cross-validated estimate",
        "",
        f"{scheme['method']} on the {scheme['rows']} development rows (train + validation; the test split is "
        f"never used), seed {scheme['seed']}, for exactly these hyperparameters; {measured}; "
        f"{scheme['seconds']:.0f} s. Mean ± std over the {scheme['folds'] * scheme['repeats']} folds; the paired row "
        "is stack minus the best single learner fold by fold, with the Nadeau–Bengio corrected standard error.",
        "",
        cv_table(cv),
        "",
        "## Test split (the single final evaluation)",
        "",
        f"Decision threshold {ev['threshold']:.4f}: {ev['threshold_rule']}.",
        "",
        metrics_table(report),
        "",
        "## Decisions in money",
        "",
        decision_table(ev["decision"]),
        "",
        "## Per-group metrics (test split, at the served threshold)",
        "",
        groups_table(ev["group_metrics"], ev["group_gaps"]),
        "",
        "Largest gaps: "
        + "; ".join(f"{m} {g['gap']:.3f} ({g['feature']}: {g['highest']} vs {g['lowest']})" for m, g in big.items())
        + ". Positive-rate and recall gaps largely follow the groups' churn rates (shown): a threshold on a "
        "calibrated churn probability offers more to groups that churn more. Small groups (see count) have wide "
        "error bars.",
        "",
        "## Calibration",
        "",
        f"Stack, out of fold (cross-validation, mean over repeats): slope {cal['slope']:.3f}, intercept "
        f"{cal['intercept']:+.3f}, expected calibration error {cal['expected_calibration_error']:.4f}; Brier "
        f"{cal['brier']:.4f}, after cross-fitted Platt scaling {cal['brier_platt']:.4f}, after isotonic regression "
        f"{cal['brier_isotonic']:.4f}. {report['calibration']['verdict']}",
        "",
        *(f"![{p}]({p})" for p in plots),
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    return out


def cv_table(cv: Mapping[str, Any]) -> str:
    """Markdown table: mean ± std of each metric for the stack and every learner."""
    lines = [
        "| learner | ROC AUC | PR AUC | Brier |",
        "|---|---|---|---|",
    ]
    for name in LEARNERS:
        cells = [f"{cv[m][name]['mean']:.4f} ± {cv[m][name]['std']:.4f}" for m in PROBABILITY_METRICS]
        label = f"**{name}**" if name == "stack" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    d = cv["stack_minus_best"]
    cells = [
        f"{d[m]['mean']:+.4f} ± {d[m]['std']:.4f} (SE {d[m]['corrected_se']:.4f}; better in {d[m]['stack_better_folds']}"
        f"/{d[m]['folds']})"
        for m in PROBABILITY_METRICS
    ]
    lines.append(f"| stack − {d['learner']} (paired) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
