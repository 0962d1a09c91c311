"""`python -m monitoring.performance --outcomes FILE --out DIR`: how good were the served
predictions, now that the outcomes are known?

FILE is a CSV of outcomes: `Exited` (0/1) and, to find the prediction it settles, either
`request_id` (with `row` for a /predict_batch, V2 or job row) or `CustomerId`; `date` (when
the outcome was recorded, ISO 8601) is optional. A CustomerId outcome settles the customer's
latest logged prediction made before its date (before now when there is none); a request-id
outcome settles the prediction logged under that id (and row). Outcomes that match nothing,
or more than one prediction, are counted and left out.

On the matched rows: ROC AUC, PR AUC (average precision) and Brier score, each beside the
model's training estimate (cross-validated mean ± std) and flagged when it falls below it
(worse than the mean by more than 2 standard deviations of the estimate, widened by
sqrt(fold rows / matched rows) when fewer rows were matched than a fold held); calibration
(slope and intercept of a logistic fit on logit(p), expected calibration error over 10
quantile bins) beside the out-of-fold calibration; the expected value of the served
decisions (offer cost and churner value of the model's cost model) beside the test split's.
Writes DIR/performance.json and DIR/performance.html; exits 1 when a metric fell below its
estimate, 0 otherwise, 2 when it cannot judge (no outcomes matched, no such model).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.schema import ID_COLUMN, TARGET
from models.store import ModelLoadError
from monitoring import push
from monitoring.logged import iso, load_logged, parse_when
from monitoring.reference import model_entry
from serving.settings import Settings

logger = logging.getLogger("monitoring.performance")

REQUEST_ID, ROW, DATE = "request_id", "row", "date"
LOGGED = ("time", "model_version", REQUEST_ID, "job_id", ROW, ID_COLUMN, "churn_probability", "will_churn")
HIGHER_IS_BETTER = {"roc_auc": True, "pr_auc": True, "brier": False}
TOLERANCE_STD = 2.0
EXIT_BELOW, EXIT_CANNOT_JUDGE = 1, 2


class CannotJudge(Exception):
    """No verdict is possible: exit status 2."""


def read_outcomes(path: Path) -> pd.DataFrame:
    """The outcomes file, checked: Exited 0/1, and a CustomerId or a request_id on every row."""
    try:
        outcomes = pd.read_csv(path, dtype={ID_COLUMN: str, REQUEST_ID: str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CannotJudge(f"cannot read the outcomes file {path}: {exc}") from None
    if TARGET not in outcomes.columns:
        raise CannotJudge(f"{path} has no {TARGET} column (0/1); it has: {', '.join(outcomes.columns) or 'nothing'}")
    if ID_COLUMN not in outcomes.columns and REQUEST_ID not in outcomes.columns:
        raise CannotJudge(f"{path} needs a {ID_COLUMN} or a {REQUEST_ID} column to find the predictions it settles")
    target = pd.to_numeric(outcomes[TARGET], errors="coerce")
    bad = ~target.isin([0, 1])
    if bad.any():
        raise CannotJudge(f"{path}: {int(bad.sum())} rows have an {TARGET} other than 0 or 1 (first: data row {int(np.flatnonzero(bad)[0]) + 1})")  # fmt: skip
    outcomes[TARGET] = target.astype("int64")
    for column in (ID_COLUMN, REQUEST_ID):
        if column not in outcomes.columns:
            outcomes[column] = ""
    if DATE in outcomes.columns:
        dates = pd.to_datetime(outcomes[DATE].replace("", None), utc=True, errors="coerce", format="ISO8601")
        if (dates.isna() & (outcomes[DATE] != "")).any():
            raise CannotJudge(f"{path}: {DATE} must be an ISO 8601 date or time (e.g. 2027-03-31)")
        outcomes[DATE] = dates
    else:
        outcomes[DATE] = pd.Series(pd.NaT, index=outcomes.index, dtype="datetime64[ns, UTC]")
    if ROW in outcomes.columns:
        outcomes[ROW] = pd.to_numeric(outcomes[ROW].replace("", None), errors="coerce").astype("Int64")
    else:
        outcomes[ROW] = pd.array([pd.NA] * len(outcomes), dtype="Int64")
    return outcomes


def match(outcomes: pd.DataFrame, logged: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Each outcome with the prediction it settles: (matched rows with churn_probability,
    will_churn, model_version and Exited; counts of what did not match)."""
    logged = logged.assign(when=pd.to_datetime(logged["time"], utc=True, format="ISO8601"))
    by_request = outcomes[outcomes[REQUEST_ID] != ""]
    by_customer = outcomes[(outcomes[REQUEST_ID] == "") & (outcomes[ID_COLUMN] != "")]
    parts, counts = (
        [],
        {"unmatched": 0, "ambiguous": 0, "no_key": int(len(outcomes) - len(by_request) - len(by_customer))},
    )

    if len(by_request):
        keyed = logged[logged[REQUEST_ID].notna()]
        candidates = by_request.reset_index(names="outcome").merge(keyed, on=REQUEST_ID, suffixes=("", "_logged"))
        with_row = candidates[ROW].notna()
        candidates = candidates[~with_row | (candidates[ROW] == candidates[f"{ROW}_logged"])]
        found = candidates.groupby("outcome").size()
        counts["ambiguous"] += int((found > 1).sum())
        counts["unmatched"] += int(len(by_request) - len(found))
        parts.append(candidates[candidates["outcome"].isin(found[found == 1].index)])

    if len(by_customer):
        keyed = logged[logged[ID_COLUMN].notna()].sort_values("when")
        candidates = by_customer.reset_index(names="outcome").merge(keyed, on=ID_COLUMN, suffixes=("", "_logged"))
        candidates = candidates[candidates[DATE].isna() | (candidates["when"] <= candidates[DATE])]
        latest = candidates.sort_values("when").groupby("outcome").tail(1)
        counts["unmatched"] += int(len(by_customer) - len(latest))
        parts.append(latest)

    columns = ["outcome", TARGET, "churn_probability", "will_churn", "model_version"]
    matched = pd.concat([p[columns] for p in parts], ignore_index=True) if parts else pd.DataFrame(columns=columns)
    return matched.sort_values("outcome").reset_index(drop=True), counts


def calibration(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Slope and intercept of a logistic fit of y on logit(p) (1 and 0 when calibrated), and the
    expected calibration error over 10 quantile bins, as training measures them; the bins."""
    from sklearn.linear_model import LogisticRegression

    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    z = (np.log(clipped) - np.log1p(-clipped)).reshape(-1, 1)
    out: dict[str, Any] = {"slope": None, "intercept": None}
    if len(np.unique(y)) == 2:
        fit = LogisticRegression(C=1e6, max_iter=1000).fit(z, y)
        out.update(slope=float(fit.coef_[0, 0]), intercept=float(fit.intercept_[0]))
    edges = np.quantile(p, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    bins, ece = [], 0.0
    for b in range(10):
        mask = which == b
        if mask.any():
            ece += abs(y[mask].mean() - p[mask].mean()) * mask.mean()
            bins.append({"rows": int(mask.sum()), "mean_predicted": float(p[mask].mean()), "observed_rate": float(y[mask].mean())})  # fmt: skip
    out["expected_calibration_error"] = float(ece)
    out["bins"] = bins
    return out


def evaluate(matched: pd.DataFrame, metadata: dict[str, Any]) -> dict[str, Any]:
    """The realized metrics of the matched rows beside the model's training estimates."""
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    y = matched[TARGET].to_numpy(dtype=np.int64)
    p = matched["churn_probability"].to_numpy(dtype=np.float64)
    n = len(y)
    if len(np.unique(y)) < 2:
        raise CannotJudge(f"the {n} matched outcomes are all {TARGET}={y[0]}: ROC and PR AUC need both classes")
    realized = {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
    }
    cv = metadata.get("cross_validation", {})
    scheme = cv.get("scheme", {})
    fold_rows = scheme.get("rows", 0) / max(scheme.get("folds", 1), 1)
    widen = math.sqrt(max(1.0, fold_rows / n)) if fold_rows else 1.0
    test = metadata.get("metrics", {})
    metrics = {}
    for name, value in realized.items():
        estimate = cv.get(name, {}).get("stack")
        entry: dict[str, Any] = {"realized": value, "estimate": estimate, "test_split": test.get(name)}
        if estimate is not None:
            tolerance = TOLERANCE_STD * estimate["std"] * widen
            worse = (
                value < estimate["mean"] - tolerance if HIGHER_IS_BETTER[name] else value > estimate["mean"] + tolerance
            )
            entry.update(tolerance=tolerance, below_estimate=bool(worse))
        metrics[name] = entry
    decision = metadata.get("decision", {})
    offered = matched["will_churn"].to_numpy(dtype=bool)
    cost, value_kept = decision.get("offer_cost"), decision.get("customer_value")
    if cost is not None and value_kept is not None:
        ev = float(np.sum(np.where(offered, value_kept * y - cost, 0.0)))
        metrics["expected_value_per_customer"] = {
            "realized": ev / n,
            "estimate": None,
            "test_split": decision.get("expected_value_per_customer"),
            "total": ev,
            "offers": int(offered.sum()),
            "offer_cost": cost,
            "customer_value": value_kept,
        }
    trained_calibration = metadata.get("calibration", {}).get("stack_out_of_fold", {})
    return {
        "metrics": metrics,
        "calibration": {
            **calibration(y, p),
            "training_out_of_fold": {
                k: trained_calibration.get(k) for k in ("slope", "intercept", "expected_calibration_error")
            },
        },
        "churn_rate": float(y.mean()),
        "training_churn_rate": metadata.get("data", {}).get("churn_rate"),
    }


def run(outcomes_path: Path, since: float, until: float | None, out: Path, settings: Settings) -> dict[str, Any]:
    outcomes = read_outcomes(outcomes_path)
    logged = load_logged(settings, since, until, LOGGED)
    window = {"since": iso(since), "until": iso(until if until is not None else time.time())}
    if logged.empty:
        raise CannotJudge(f"no logged predictions from {window['since']} to {window['until']}")
    matched, counts = match(outcomes, logged)
    if matched.empty:
        raise CannotJudge(
            f"none of the {len(outcomes)} outcomes matched a logged prediction from {window['since']} to "
            f"{window['until']} ({counts['unmatched']} unmatched, {counts['ambiguous']} ambiguous, "
            f"{counts['no_key']} without a {ID_COLUMN} or {REQUEST_ID})"
        )
    versions = matched["model_version"].astype(str).value_counts()
    version = str(versions.index[0])
    judged = matched[matched["model_version"].astype(str) == version]
    try:
        metadata = model_entry(version).metadata
    except ModelLoadError as exc:
        raise CannotJudge(str(exc)) from None
    summary = {
        "model_version": version,
        "rows_matched": len(judged),
        "rows_outcomes": len(outcomes),
        "rows_unmatched": counts["unmatched"],
        "rows_ambiguous": counts["ambiguous"],
        "rows_without_key": counts["no_key"],
        "rows_other_models": {v: int(c) for v, c in versions.items() if v != version},
        **evaluate(judged, metadata),
        "window": window,
        "generated_at": iso(time.time()),
    }
    for name in ("roc_auc", "pr_auc", "brier"):
        summary[name] = summary["metrics"][name]["realized"]
    summary["below_estimate"] = [n for n, m in summary["metrics"].items() if m.get("below_estimate")]
    out.mkdir(parents=True, exist_ok=True)
    (out / "performance.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "performance.html").write_text(render_html(summary))
    return summary


def render_html(s: dict[str, Any]) -> str:
    """A self-contained page (no scripts): the metrics beside their estimates, calibration bins."""

    def fmt(value: Any, digits: int = 4) -> str:
        return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))

    rows = []
    for name, m in s["metrics"].items():
        estimate = m.get("estimate")
        est = "—" if not estimate else f"{estimate['mean']:.4f} ± {estimate['std']:.4f}"
        flag = {True: '<b class="bad">below the estimate</b>', False: "within", None: "—"}[m.get("below_estimate")]
        rows.append(f"<tr><td>{name}</td><td>{fmt(m['realized'])}</td><td>{est}</td><td>{fmt(m.get('test_split'))}</td><td>{flag}</td></tr>")  # fmt: skip
    cal = s["calibration"]
    trained = cal["training_out_of_fold"]
    bins = "".join(
        f"<tr><td>{b['rows']}</td><td>{b['mean_predicted']:.3f}</td><td>{b['observed_rate']:.3f}</td></tr>"
        for b in cal["bins"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Realized performance: {html.escape(s["model_version"])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:right}}td:first-child,th:first-child{{text-align:left}}
.bad{{color:#b00}}</style></head><body>
<h1>Realized performance of {html.escape(s["model_version"])}</h1>
<p>{s["rows_matched"]} outcomes matched to predictions logged from {s["window"]["since"]} to {s["window"]["until"]}
({s["rows_unmatched"]} unmatched, {s["rows_ambiguous"]} ambiguous, {s["rows_without_key"]} without a key, of
{s["rows_outcomes"]}). Churn rate {fmt(s["churn_rate"], 3)} (training data: {fmt(s["training_churn_rate"], 3)}).</p>
<table><tr><th>metric</th><th>realized</th><th>training estimate (CV mean ± std)</th><th>test split</th><th>verdict</th></tr>
{"".join(rows)}</table>
<h2>Calibration</h2>
<p>Slope {fmt(cal["slope"], 3)} (training, out of fold: {fmt(trained["slope"], 3)}), intercept {fmt(cal["intercept"], 3)}
({fmt(trained["intercept"], 3)}), expected calibration error {fmt(cal["expected_calibration_error"])}
({fmt(trained["expected_calibration_error"])}).</p>
<table><tr><th>rows</th><th>mean predicted</th><th>observed churn rate</th></tr>{bins}</table>
<p>Generated {s["generated_at"]} by <code>python -m monitoring.performance</code>.</p>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monitoring.performance", description=__doc__.split("\n\n")[0])
    p.add_argument("--outcomes", type=Path, required=True, help="CSV: Exited, CustomerId or request_id [+ row], date")
    p.add_argument("--out", type=Path, default=Path("reports/monitoring"), help="directory for performance.{json,html}")
    p.add_argument("--since", help="oldest predictions to consider (default: all the log keeps)")
    p.add_argument("--until", help="newest predictions to consider (default: now)")
    p.add_argument("--pushgateway", default=os.environ.get("BANKCHURN_PUSHGATEWAY_URL"), help="Pushgateway URL")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings()
    now = time.time()
    try:
        since = parse_when(a.since, now) if a.since else now - settings.prediction_log_retention_hours * 3600
        until = parse_when(a.until, now) if a.until else None
    except ValueError as exc:
        p.error(str(exc))
    out = Path(time.strftime(str(a.out), time.gmtime(now)))
    summary: dict[str, Any] = {}
    try:
        summary = run(a.outcomes, since, until, out, settings)
        status = EXIT_BELOW if summary["below_estimate"] else 0
        print(verdict(summary, out))
    except CannotJudge as exc:
        status = EXIT_CANNOT_JUDGE
        out.mkdir(parents=True, exist_ok=True)
        (out / "performance.json").write_text(
            json.dumps({"error": str(exc), "generated_at": iso(now)}, indent=2) + "\n"
        )
        print(f"cannot judge performance: {exc}", file=sys.stderr)
    if a.pushgateway:
        try:
            registry = push.performance_registry(summary, status != 2)
            push.push(a.pushgateway, push.PERFORMANCE_JOB, registry, replace=status != 2)
        except Exception as exc:
            print(f"could not push to the Pushgateway at {a.pushgateway}: {exc}", file=sys.stderr)
            return status or EXIT_CANNOT_JUDGE
    return status


def verdict(s: dict[str, Any], out: Path) -> str:
    lines = [f"{s['model_version']}: {s['rows_matched']} outcomes matched ({s['rows_unmatched']} unmatched)"]
    for name, m in s["metrics"].items():
        estimate = m.get("estimate")
        beside = f" (estimate {estimate['mean']:.4f} ± {estimate['std']:.4f})" if estimate else ""
        flag = "  BELOW THE ESTIMATE" if m.get("below_estimate") else ""
        lines.append(f"  {name:<28} {m['realized']:.4f}{beside}{flag}")
    lines.append(f"reports: {out / 'performance.html'}, {out / 'performance.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
