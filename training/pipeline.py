"""The training run: load -> split -> cross-validate -> fit -> evaluate -> compile -> save."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml

from models.ensemble import resolve_params
from models.schema import FEATURE_NAMES, TARGET, schema_dict
from models.store import COMPILED_FILE, REFERENCE_FILE, library_versions, save_model
from training.cv import cross_validate, cv_key, stored_estimate
from training.data import DEFAULT_DATA, Splits, development_part, file_sha256, load_data, stratify_split
from training.decision import CUSTOMER_VALUE, OFFER_COST, CostModel
from training.evaluate import evaluate, write_report
from training.fit import fit_pipeline
from training.records import PARAMS_FILE, params_sha256, read_json

# Calibrate the stack only if recalibration, fitted on other rows, would lower its out-of-fold
# Brier score by more than this share (below it, a calibrator adds a step and buys nothing).
CALIBRATION_GAIN = 0.01

DEFAULT_REPORT_DIR = Path(__file__).resolve().parent.parent / "reports" / "training"


@dataclass
class TrainConfig:
    data: Path = DEFAULT_DATA
    seed: int = 42
    test_size: float = 0.2
    validation_size: float = 0.16
    fast: bool = False
    compile: bool = True
    stage: str = "dev"
    background_rows: int = 10
    report_dir: Path | None = DEFAULT_REPORT_DIR
    sample: int | None = None  # train on a stratified sample of this many rows (tests)
    params_file: Path | None = PARAMS_FILE  # tuned hyperparameters; None: the defaults
    offer_cost: float = OFFER_COST
    customer_value: float = CUSTOMER_VALUE
    cv_folds: int | None = None  # None: 5 (3 in fast mode)
    cv_repeats: int | None = None  # None: 3 (1 in fast mode)

    @property
    def cv_scheme(self) -> tuple[int, int]:
        return (self.cv_folds or (3 if self.fast else 5), self.cv_repeats or (1 if self.fast else 3))


@dataclass
class TrainResult:
    model: bentoml.Model
    report: dict[str, Any]
    pipeline: Any
    splits: Splits


class _Stages:
    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any], describe: Callable[[Any], str] = lambda _: "") -> Any:
        self.log(f"[{name}] ...")
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - t0, 3)
        note = describe(out)
        self.log(f"[{name}] done in {self.timings[name]:.2f}s{'  ' + note if note else ''}")
        return out


def tuning_record(cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The hyperparameters to train with and where they come from (metadata `tuning`)."""
    record = read_json(cfg.params_file) if cfg.params_file is not None else None
    params = record["params"] if record else {}
    resolved = resolve_params(params, cfg.fast)
    if record:
        source = (
            f"{Path(cfg.params_file).name} ({record['provenance']['command']}, commit {record['provenance']['commit']})"
        )
    else:
        source = "the defaults in models/ensemble.py (untuned)"
    info = {
        "source": source,
        "params": resolved,
        "params_sha256": params_sha256(resolved),
        **({"search": record["search"], "provenance": record["provenance"]} if record else {}),
    }
    if cfg.fast:
        info["source"] += f"; fast mode: at most {resolved['random_forest']['n_estimators']} trees per ensemble"
    return params, info


def estimate_by_cv(cfg: TrainConfig, splits: Splits, params: dict, log: Callable[[str], None]) -> dict[str, Any]:
    """The cross-validated estimate for exactly this run's hyperparameters, data and split: the
    committed one (python -m training.cv) when it matches, else measured now."""
    folds, repeats = cfg.cv_scheme
    dev = development_part(splits)
    key = cv_key(file_sha256(Path(cfg.data)), cfg.seed, cfg.test_size, len(dev), cfg.fast, params, folds, repeats)
    stored = stored_estimate(key)
    if stored is not None:
        log(f"  using the stored estimate ({stored['source']['file']}, {stored['source']['command']})")
        return stored
    log(
        f"  no stored estimate for these hyperparameters, data and split: running {repeats}x{folds}-fold CV now "
        "(`python -m training.cv` stores one)"
    )
    return cross_validate(
        dev[list(FEATURE_NAMES)],
        dev[TARGET],
        seed=cfg.seed,
        fast=cfg.fast,
        params=params,
        folds=folds,
        repeats=repeats,
        progress=log,
    )


def calibration_record(cv: dict[str, Any], test_brier: dict[str, float]) -> dict[str, Any]:
    """Whether the stack needs a calibrator, decided on its out-of-fold probabilities."""
    cal = cv["stack_calibration"]
    gain = cal["brier"] - min(cal["brier_platt"], cal["brier_isotonic"])
    needed = gain > CALIBRATION_GAIN * cal["brier"]
    what = (
        f"The better recalibration fitted on other rows (Platt or isotonic, 5-fold cross-fitted) changes the "
        f"stack's out-of-fold Brier score by {-gain:+.5f} ({-gain / cal['brier']:+.2%}); a calibrator is added "
        f"only if it lowers it by more than {CALIBRATION_GAIN:.0%}"
    )
    if needed:
        verdict = what + ": the stack is miscalibrated."
    else:
        verdict = what + ", so none is: the stack's meta-learner (a logistic regression) already calibrates it."
    return {
        "applied": "none" if not needed else "needed, not applied",
        "verdict": verdict,
        "stack_out_of_fold": cal,
        "test_brier": test_brier,
    }


def reference_frame(X: Any, y: Any, out_of_fold: Any) -> Any:
    """The drift reference stored with the model: features, target and out-of-fold P(churn)."""
    frame = X[list(FEATURE_NAMES)].reset_index(drop=True)
    frame[TARGET] = y.to_numpy()
    frame["churn_probability"] = out_of_fold
    return frame


def check_metadata(value: Any, path: str = "metadata") -> None:
    """The model store takes JSON-able values only, and no None; NaN would reach /model_card
    as invalid JSON. Raise naming the offending key instead."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{path} is {value!r}: model-store metadata must be finite and not None")
    if isinstance(value, dict):
        for k, v in value.items():
            check_metadata(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_metadata(v, f"{path}[{i}]")
    elif not isinstance(value, str | int | float | bool):
        raise ValueError(f"{path} is a {type(value).__name__}, not a JSON value")


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    stages = _Stages(log)
    cost = CostModel(cfg.offer_cost, cfg.customer_value)
    df = stages.run("load", lambda: load_data(cfg.data), lambda d: f"{len(d)} rows, {d['Exited'].mean():.1%} churn")
    if cfg.sample and cfg.sample < len(df):
        from sklearn.model_selection import train_test_split

        df, _ = train_test_split(df, train_size=cfg.sample, stratify=df["Exited"], random_state=cfg.seed)
    splits = stratify_split(df, cfg.test_size, cfg.validation_size, cfg.seed)
    X_train, y_train = splits.xy(splits.train)
    X_val, y_val = splits.xy(splits.validation)
    X_test, y_test = splits.xy(splits.test)
    log(f"  split: train {len(X_train)} / validation {len(X_val)} / test {len(X_test)} (stratified, seed {cfg.seed})")
    params, tuning = tuning_record(cfg)
    log(f"  hyperparameters: {tuning['source']}")

    cv = stages.run(
        "cross-validate",
        lambda: estimate_by_cv(cfg, splits, params, log),
        lambda r: (
            f"CV ROC AUC stack {r['roc_auc']['stack']['mean']:.4f} ± {r['roc_auc']['stack']['std']:.4f}, "
            f"best learner {r['stack_minus_best']['learner']} "
            f"{r['roc_auc'][r['stack_minus_best']['learner']]['mean']:.4f}"
        ),
    )
    pipeline, out_of_fold = stages.run(
        "fit", lambda: fit_pipeline(X_train, y_train, cfg.seed, cfg.fast, progress=log, params=params)
    )
    evaluation = stages.run(
        "evaluate",
        lambda: evaluate(pipeline, X_val, y_val, X_test, y_test, cost),
        lambda e: (
            f"test ROC AUC {e['test']['roc_auc']:.4f}, expected-value threshold {e['threshold']:.4f} "
            f"(F1 threshold {e['decision']['f1_threshold']['threshold']:.4f})"
        ),
    )
    plot_data = {k: evaluation.pop(k) for k in [k for k in evaluation if k.startswith("_")]}

    # The drift reference: the rows the model learnt from and what the model says about rows it
    # has not seen (its out-of-fold predictions; in-sample ones are overconfident).
    reference = reference_frame(X_train, y_train, out_of_fold)
    extra_files: dict[str, bytes] = {REFERENCE_FILE: reference.to_csv(index=False).encode()}
    compiled_info: dict[str, Any] = {"enabled": False}
    if cfg.compile:
        from models.onnx_session import CompiledModel
        from training.onnx_export import compile_pipeline, parity_report

        def _compile():
            t0 = time.perf_counter()
            blob = compile_pipeline(pipeline)
            seconds = time.perf_counter() - t0
            # Parity on every row of the dataset, not just the test split.
            parity = parity_report(pipeline, CompiledModel(blob), df, evaluation["threshold"])
            return blob, {
                "enabled": True,
                "file": COMPILED_FILE,
                "bytes": len(blob),
                "seconds": round(seconds, 2),
                **parity,
            }

        blob, compiled_info = stages.run(
            "compile",
            _compile,
            lambda r: (
                f"max |p_onnx - p_sklearn| = {r[1]['max_abs_diff']:.2e} over {r[1]['rows']} rows, "
                f"{r[1]['decision_mismatches']} decision mismatches -> {'PASSED' if r[1]['passed'] else 'FAILED'}"
            ),
        )
        if compiled_info["passed"]:
            extra_files[COMPILED_FILE] = blob
        else:
            log("  parity failed: the compiled model is NOT saved; the service will serve the sklearn pipeline")

    background = splits.train.sample(n=min(cfg.background_rows, len(splits.train)), random_state=cfg.seed)
    metadata = {
        "threshold": evaluation["threshold"],
        "threshold_rule": evaluation["threshold_rule"],
        "metrics": evaluation["test"],
        "base_learners_test_roc_auc": evaluation["base_learners_test_roc_auc"],
        "cross_validation": cv,
        "decision": evaluation["decision"],
        "group_metrics": evaluation["group_metrics"],
        "group_gaps": evaluation["group_gaps"],
        "largest_group_gap": evaluation["largest_group_gap"],
        "calibration": calibration_record(cv, evaluation["test_brier"]),
        "tuning": tuning,
        "feature_schema": schema_dict(),
        "data": {
            "path": Path(cfg.data).name,
            "sha256": file_sha256(Path(cfg.data)),
            "rows": len(df),
            "train_rows": len(X_train),
            "validation_rows": len(X_val),
            "test_rows": len(X_test),
            "churn_rate": float(df["Exited"].mean()),
        },
        "seed": cfg.seed,
        "fast": cfg.fast,
        "library_versions": library_versions(),
        "compiled": compiled_info,
        "background_rows": len(background),
        "reference": {
            "file": REFERENCE_FILE,
            "rows": len(reference),
            "of": "the fit split (every row the model was fitted on), with the target",
            "churn_probability": "the stack's out-of-fold predictions: its meta-learner on the out-of-fold "
            "probabilities of base learners fitted without each row",
        },
        "training_seconds": stages.timings,
    }
    check_metadata(metadata)
    labels = {"framework": "sklearn", "ensemble": "stacking", "stage": cfg.stage}
    model = stages.run(
        "save",
        lambda: save_model(pipeline, metadata, labels, background.to_dict(orient="records"), extra_files),
        lambda m: f"saved {m.tag}",
    )
    report = {"model_tag": str(model.tag), "seed": cfg.seed, "fast": cfg.fast, "evaluation": evaluation, **metadata}
    if cfg.report_dir is not None:
        out = write_report(report, y_test, {**evaluation, **plot_data}, Path(cfg.report_dir))
        log(f"  report: {out / 'report.md'}")
    log(f"total {time.perf_counter() - stages.start:.1f}s")
    return TrainResult(model=model, report=report, pipeline=pipeline, splits=splits)
