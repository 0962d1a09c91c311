"""`python -m monitoring.drift --since 24h --out DIR`: has the traffic drifted from the data
the served model learnt from?

Reads the rows the service logged in the window (its prediction log, with its settings),
takes the model version that served most of them, and compares them with that model's
reference (the fit split's features and the model's out-of-fold predictions, stored by
training): per feature, with a method suited to its type, and the churn probability itself.
Writes DIR/drift.html (Evidently's report, for a person) and DIR/drift.json (for a machine);
exits 1 when a feature or the prediction drifted, 0 when nothing did, 2 when it cannot judge
(no or too few logged rows, no reference). With BANKCHURN_PUSHGATEWAY_URL (or --pushgateway)
the figures go to a Prometheus Pushgateway too.

Methods (Evidently's implementations, fixed rather than chosen by sample size, so the verdict
does not change with the traffic's volume): numerical features and the probability, the
Wasserstein distance normed by the reference's standard deviation; categories, flags and
integers with at most 20 distinct reference values (Tenure, NumOfProducts), the Jensen-Shannon
distance. Both are distances, not p-values: a million logged rows do not turn a negligible
shift into "drift". A column drifted when its distance is at or above the threshold (0.1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from models.schema import BY_NAME, FEATURE_NAMES
from models.store import ModelLoadError
from monitoring import push
from monitoring.logged import FEATURES_AND_OUTPUT, iso, load_logged, parse_when
from monitoring.reference import model_entry, reference_frame
from serving.predictionlog.sinks import open_sink
from serving.settings import Settings

logger = logging.getLogger("monitoring.drift")

PREDICTION = "churn_probability"
THRESHOLD = 0.1
DISCRETE_MAX_VALUES = 20
METHODS = {"numerical": ("wasserstein", "Wasserstein distance (normed)"), "categorical": ("jensenshannon", "Jensen-Shannon distance")}  # fmt: skip
MIN_ROWS = 100
EXIT_DRIFT, EXIT_CANNOT_JUDGE = 1, 2


class CannotJudge(Exception):
    """No verdict is possible (no rows, too few, no reference): exit status 2."""


def evidently() -> Any:
    """Evidently, imported for the reports only. Two things first: DO_NOT_TRACK keeps its usage
    telemetry off, and pandas 3 removed `pandas.core.dtypes.common.infer_dtype_from_object`,
    which Evidently 0.7.23 imports at start-up (for a legacy column-type test this job never
    runs): an equivalent is put back so the import succeeds."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import pandas.core.dtypes.common as common

    if not hasattr(common, "infer_dtype_from_object"):
        common.infer_dtype_from_object = lambda dtype: common.pandas_dtype(dtype).type
    import evidently
    import evidently.metrics
    import evidently.presets

    return evidently


def column_types(reference: pd.DataFrame) -> dict[str, str]:
    """'numerical' or 'categorical' for each feature, from the schema and the reference."""
    types = {}
    for name in FEATURE_NAMES:
        kind = BY_NAME[name].kind
        discrete = kind == "int" and reference[name].nunique() <= DISCRETE_MAX_VALUES
        types[name] = "categorical" if kind in ("category", "flag") or discrete else "numerical"
    return types


def compare(current: pd.DataFrame, reference: pd.DataFrame) -> tuple[dict[str, Any], Any]:
    """Per-feature and prediction drift of `current` against `reference` (both with the ten
    features and churn_probability): the JSON summary's drift part and Evidently's snapshot."""
    ev = evidently()
    types = column_types(reference)
    definition = ev.DataDefinition(
        numerical_columns=[n for n in FEATURE_NAMES if types[n] == "numerical"] + [PREDICTION],
        categorical_columns=[n for n in FEATURE_NAMES if types[n] == "categorical"],
    )
    per_column = {name: METHODS[types[name]][0] for name in FEATURE_NAMES}
    report = ev.Report(
        [
            # drift_share: the report's headline says "Dataset Drift is detected" as this job's verdict
            # does, on one drifted feature (Evidently's default waits for half of them).
            ev.presets.DataDriftPreset(
                columns=list(FEATURE_NAMES),
                per_column_method=per_column,
                threshold=THRESHOLD,
                drift_share=1 / len(FEATURE_NAMES),
                include_tests=False,
            ),
            ev.metrics.ValueDrift(column=PREDICTION, method=METHODS["numerical"][0], threshold=THRESHOLD),
        ]
    )
    columns = list(FEATURES_AND_OUTPUT)
    snapshot = report.run(
        current_data=ev.Dataset.from_pandas(_plain(current[columns]), data_definition=definition),
        reference_data=ev.Dataset.from_pandas(_plain(reference[columns]), data_definition=definition),
    )
    scores = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith(":ValueDrift"):
            scores[config["column"]] = float(metric["value"])
    features = {
        name: {
            "type": types[name],
            "method": METHODS[types[name]][1],
            "score": scores[name],
            "threshold": THRESHOLD,
            "drifted": scores[name] >= THRESHOLD,
        }
        for name in FEATURE_NAMES
    }
    drifted = [name for name in FEATURE_NAMES if features[name]["drifted"]]
    prediction = {
        "method": METHODS["numerical"][1],
        "score": scores[PREDICTION],
        "threshold": THRESHOLD,
        "drifted": scores[PREDICTION] >= THRESHOLD,
    }
    summary = {
        "drift": bool(drifted) or prediction["drifted"],
        "drifted_features": drifted,
        "share_drifted": len(drifted) / len(FEATURE_NAMES),
        "prediction_drift": prediction["drifted"],
        "rows_current": len(current),
        "rows_reference": len(reference),
        "features": features,
        "prediction": prediction,
    }
    return summary, snapshot


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Categories as plain strings: Evidently compares category values, not pandas dtypes."""
    return frame.astype({c: "object" for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)})


def run(since: float, until: float | None, out: Path, settings: Settings, min_rows: int = MIN_ROWS) -> dict[str, Any]:
    """Read, compare, write DIR/drift.json and DIR/drift.html; the summary. Raises CannotJudge."""
    started = time.monotonic()
    logged = load_logged(settings, since, until, ("model_version", *FEATURES_AND_OUTPUT))
    window = {"since": iso(since), "until": iso(until if until is not None else time.time())}
    if logged.empty:
        raise CannotJudge(f"no logged predictions from {window['since']} to {window['until']} in {_sink(settings)}")
    versions = logged["model_version"].value_counts()
    version = str(versions.index[0])
    current = logged[logged["model_version"] == version]
    if len(current) < min_rows:
        raise CannotJudge(
            f"only {len(current)} logged predictions of {version} from {window['since']} to {window['until']}; "
            f"at least {min_rows} are needed to judge drift (--min-rows)"
        )
    try:
        bundle = model_entry(version)
    except ModelLoadError as exc:
        raise CannotJudge(str(exc)) from None
    summary, snapshot = compare(current, reference_frame(bundle))
    summary = {
        **summary,
        "model_version": version,
        "window": window,
        "rows_other_models": {str(v): int(n) for v, n in versions.items() if str(v) != version and n},
        "sink": _sink(settings),
        "generated_at": iso(time.time()),
        "seconds": round(time.monotonic() - started, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out / "drift.html"))
    (out / "drift.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _sink(settings: Settings) -> str:
    sink = open_sink(settings.model_copy(update={"prediction_log_sample": 1.0}))
    if sink is None:
        return f"files under {settings.prediction_log_dir.resolve()}"
    sink.close()
    return sink.describe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monitoring.drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--since", default="24h", help="start of the window: a duration ago (24h, 7d) or an ISO time")
    p.add_argument("--until", help="end of the window (default: now)")
    p.add_argument(
        "--out", type=Path, required=True, help="directory for drift.json and drift.html (strftime fields allowed)"
    )
    p.add_argument(
        "--keep", type=int, help="keep only the newest N report directories beside DIR (those holding a drift.json)"
    )
    p.add_argument("--min-rows", type=int, default=MIN_ROWS, help=f"fewest logged rows to judge (default {MIN_ROWS})")
    p.add_argument("--pushgateway", default=os.environ.get("BANKCHURN_PUSHGATEWAY_URL"), help="Pushgateway URL")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    now = time.time()
    try:
        since = parse_when(a.since, now)
        until = parse_when(a.until, now) if a.until else None
    except ValueError as exc:
        p.error(str(exc))
    out = Path(time.strftime(str(a.out), time.gmtime(now)))
    summary: dict[str, Any] = {}
    status = 0
    try:
        summary = run(since, until, out, Settings(), a.min_rows)
        status = EXIT_DRIFT if summary["drift"] else 0
        print(verdict(summary, out))
    except CannotJudge as exc:
        status = EXIT_CANNOT_JUDGE
        out.mkdir(parents=True, exist_ok=True)
        (out / "drift.json").write_text(json.dumps({"error": str(exc), "generated_at": iso(now)}, indent=2) + "\n")
        print(f"cannot judge drift: {exc}", file=sys.stderr)
    if a.keep:
        prune(out.parent, a.keep)
    if a.pushgateway:
        try:
            push.push(a.pushgateway, push.DRIFT_JOB, push.drift_registry(summary, status != 2), replace=status != 2)
        except Exception as exc:  # the report stands; the push is reported, and the job fails
            print(f"could not push to the Pushgateway at {a.pushgateway}: {exc}", file=sys.stderr)
            return status or EXIT_CANNOT_JUDGE
    return status


def prune(parent: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` report directories under `parent` (only directories
    holding a drift.json: this job's own); the deleted ones."""
    import shutil

    reports = sorted((d for d in parent.iterdir() if (d / "drift.json").is_file()), key=lambda d: d.stat().st_mtime)
    doomed = reports[:-keep] if len(reports) > keep else []
    for directory in doomed:
        shutil.rmtree(directory, ignore_errors=True)
    return doomed


def verdict(summary: dict[str, Any], out: Path) -> str:
    lines = [
        f"{summary['model_version']}: {summary['rows_current']} logged rows from {summary['window']['since']} "
        f"to {summary['window']['until']} against {summary['rows_reference']} reference rows"
    ]
    for name, column in summary["features"].items():
        flag = "DRIFT" if column["drifted"] else "ok"
        lines.append(f"  {name:<16} {column['method']:<30} {column['score']:.4f}  {flag}")
    prediction = summary["prediction"]
    flag = "DRIFT" if prediction["drifted"] else "ok"
    lines.append(f"  {'churn_probability':<16} {prediction['method']:<30} {prediction['score']:.4f}  {flag}")
    lines.append(
        f"drifted features: {', '.join(summary['drifted_features']) or 'none'} "
        f"({summary['share_drifted']:.0%}); prediction drift: {'yes' if summary['prediction_drift'] else 'no'}"
    )
    lines.append(f"reports: {out / 'drift.html'}, {out / 'drift.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
