"""The monitoring jobs' figures as Prometheus gauges, pushed to a Pushgateway.

A CronJob's pod is gone before Prometheus could scrape it, so its results are pushed to the
Pushgateway, which Prometheus scrapes (with honor_labels): the conventional path for a
service-level batch job. A node_exporter textfile collector would tie the result to a node's
disk (a hostPath mount in a pod that runs anywhere), and a long-lived exporter would be a
second service holding a day of traffic in memory to answer scrapes. Each job pushes one group
(job=bank_churn_drift or bank_churn_performance) and replaces it whole (PUT), so a feature
that stops drifting stops reporting drift; the model version is a label, not part of the
group, so a new model's results replace the old one's instead of piling up beside them.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, pushadd_to_gateway

DRIFT_JOB = "bank_churn_drift"
PERFORMANCE_JOB = "bank_churn_performance"


def drift_registry(summary: dict[str, Any], succeeded: bool) -> CollectorRegistry:
    registry = CollectorRegistry()
    _last_run(registry, "drift", succeeded)
    if not succeeded:
        return registry
    version = summary["model_version"]
    score = Gauge(
        "bank_churn_drift_score",
        "Drift score of a feature (the method's statistic: a distance, drift at or above the threshold)",
        ["feature", "method", "model_version"],
        registry=registry,
    )
    drifted = Gauge(
        "bank_churn_drift_detected",
        "Whether a feature drifted (1) or not (0)",
        ["feature", "model_version"],
        registry=registry,
    )
    for name, column in summary["features"].items():
        score.labels(name, column["method"], version).set(column["score"])
        drifted.labels(name, version).set(int(column["drifted"]))
    prediction = summary["prediction"]
    Gauge(
        "bank_churn_drift_prediction_score",
        "Drift score of the churn probability against the reference's out-of-fold predictions",
        ["method", "model_version"],
        registry=registry,
    ).labels(prediction["method"], version).set(prediction["score"])
    Gauge(
        "bank_churn_drift_prediction_detected",
        "Whether the churn probability drifted",
        ["model_version"],
        registry=registry,
    ).labels(version).set(int(summary["prediction_drift"]))
    Gauge(
        "bank_churn_drift_share_drifted", "Share of the features that drifted", ["model_version"], registry=registry
    ).labels(version).set(summary["share_drifted"])
    Gauge(
        "bank_churn_drift_detected_overall",
        "Whether anything drifted (a feature or the prediction): the job's exit status 1",
        ["model_version"],
        registry=registry,
    ).labels(version).set(int(summary["drift"]))
    rows = Gauge("bank_churn_drift_rows", "Rows compared", ["dataset", "model_version"], registry=registry)
    rows.labels("current", version).set(summary["rows_current"])
    rows.labels("reference", version).set(summary["rows_reference"])
    return registry


def performance_registry(summary: dict[str, Any], succeeded: bool) -> CollectorRegistry:
    registry = CollectorRegistry()
    _last_run(registry, "performance", succeeded)
    if not succeeded:
        return registry
    version = summary["model_version"]
    value = Gauge(
        "bank_churn_performance_value", "Realized value of a metric on matched outcomes", ["metric", "model_version"],
        registry=registry,
    )  # fmt: skip
    estimate = Gauge(
        "bank_churn_performance_estimate",
        "The training estimate of a metric (cross-validated mean and std)",
        ["metric", "stat", "model_version"],
        registry=registry,
    )
    below = Gauge(
        "bank_churn_performance_below_estimate",
        "Whether a realized metric fell below its training estimate (1) or not (0)",
        ["metric", "model_version"],
        registry=registry,
    )
    for name, metric in summary["metrics"].items():
        value.labels(name, version).set(metric["realized"])
        if metric.get("estimate") is not None:
            estimate.labels(name, "mean", version).set(metric["estimate"]["mean"])
            estimate.labels(name, "std", version).set(metric["estimate"]["std"])
        if metric.get("below_estimate") is not None:
            below.labels(name, version).set(int(metric["below_estimate"]))
    Gauge(
        "bank_churn_performance_rows_matched",
        "Outcomes matched to a logged prediction",
        ["model_version"],
        registry=registry,
    ).labels(version).set(summary["rows_matched"])
    return registry


def _last_run(registry: CollectorRegistry, what: str, succeeded: bool) -> None:
    now = time.time()
    Gauge(f"bank_churn_{what}_last_run_timestamp_seconds", f"When the {what} job last ran", registry=registry).set(now)
    Gauge(
        f"bank_churn_{what}_last_run_succeeded",
        f"Whether the {what} job's last run produced a report",
        registry=registry,
    ).set(int(succeeded))
    if succeeded:
        Gauge(
            f"bank_churn_{what}_last_success_timestamp_seconds",
            f"When the {what} job last produced a report",
            registry=registry,
        ).set(now)


def push(url: str, job: str, registry: CollectorRegistry, replace: bool) -> None:
    """Send the group `job`: replacing what the last run pushed (PUT, a run with a report), or
    only updating the metrics sent (POST, a failed run: the last report's figures stay, beside
    last_run_succeeded 0). Raises on failure."""
    (push_to_gateway if replace else pushadd_to_gateway)(url, job=job, registry=registry, timeout=10)
