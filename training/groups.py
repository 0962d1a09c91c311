"""Per-group metrics: how the model's decisions and ranking differ across Geography, Gender and
age bands (fairlearn's MetricFrame). Visibility, not mitigation: nothing here changes the model."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from sklearn.metrics import precision_score, recall_score, roc_auc_score

# Age bands: decades through the working ages, one band for 60 and over (few customers each
# side: ~8% of the data is over 60, ~14% under 30).
AGE_BANDS: tuple[tuple[int, str], ...] = ((18, "18-29"), (30, "30-39"), (40, "40-49"), (50, "50-59"), (60, "60+"))
GROUP_FEATURES: tuple[str, ...] = ("Geography", "Gender", "age_band")
GROUP_METRICS: tuple[str, ...] = ("positive_rate", "recall", "precision", "roc_auc")


def age_band(age: pd.Series) -> pd.Series:
    """The age band of each customer, as a label ("18-29", ..., "60+")."""
    edges = [lo for lo, _ in AGE_BANDS] + [np.inf]
    return pd.cut(age, bins=edges, right=False, labels=[label for _, label in AGE_BANDS]).astype(str)


def _at(metric, threshold: float, y_true, proba, **kwargs) -> float:
    return float(metric(y_true, np.asarray(proba) >= threshold, **kwargs))


def _roc_auc(y_true, proba) -> float:
    # Undefined for a group with only one class: NaN, left out of the table.
    return float(roc_auc_score(y_true, proba)) if len(np.unique(y_true)) == 2 else float("nan")


def group_metrics(frame: pd.DataFrame, y_true: pd.Series, proba: np.ndarray, threshold: float) -> dict[str, Any]:
    """Per feature, per group: customers, churn rate, positive (offer) rate, recall, precision and
    ROC AUC at `threshold`. Metrics a group cannot define (AUC with one class) are omitted."""
    y = np.asarray(y_true)
    metrics = {
        "positive_rate": lambda yt, p: float(np.mean(np.asarray(p) >= threshold)),
        "recall": partial(_at, recall_score, threshold, zero_division=0),
        "precision": partial(_at, precision_score, threshold, zero_division=0),
        "roc_auc": _roc_auc,
        "count": lambda yt, p: float(len(yt)),
        "churn_rate": lambda yt, p: float(np.mean(yt)),
    }
    sensitive = {"Geography": frame["Geography"], "Gender": frame["Gender"], "age_band": age_band(frame["Age"])}
    out: dict[str, Any] = {}
    for feature in GROUP_FEATURES:
        mf = MetricFrame(metrics=metrics, y_true=y, y_pred=np.asarray(proba), sensitive_features=sensitive[feature])
        table = mf.by_group
        out[feature] = {
            str(group): {k: (int(v) if k == "count" else float(v)) for k, v in row.items() if not pd.isna(v)}
            for group, row in table.iterrows()
        }
    return out


def group_gaps(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per feature, per metric: the largest gap between two groups (max - min), and which groups."""
    out: dict[str, Any] = {}
    for feature, groups in metrics.items():
        out[feature] = {}
        for metric in GROUP_METRICS:
            values = {g: m[metric] for g, m in groups.items() if metric in m}
            if len(values) < 2:
                continue
            hi, lo = max(values, key=values.get), min(values, key=values.get)
            out[feature][metric] = {"gap": values[hi] - values[lo], "highest": hi, "lowest": lo}
    return out


def largest_gap(gaps: dict[str, Any], metric: str) -> dict[str, Any]:
    """The largest gap in `metric` over all grouping features."""
    feature = max((f for f in gaps if metric in gaps[f]), key=lambda f: gaps[f][metric]["gap"])
    return {"feature": feature, "metric": metric, **gaps[feature][metric]}
