"""The training run: load -> split -> fit -> evaluate -> compile -> save."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml

from models.schema import schema_dict
from models.store import COMPILED_FILE, library_versions, save_model
from training.data import DEFAULT_DATA, Splits, file_sha256, load_data, stratify_split
from training.evaluate import evaluate, write_report
from training.fit import fit_pipeline

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


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    stages = _Stages(log)
    df = stages.run("load", lambda: load_data(cfg.data), lambda d: f"{len(d)} rows, {d['Exited'].mean():.1%} churn")
    if cfg.sample and cfg.sample < len(df):
        from sklearn.model_selection import train_test_split

        df, _ = train_test_split(df, train_size=cfg.sample, stratify=df["Exited"], random_state=cfg.seed)
    splits = stratify_split(df, cfg.test_size, cfg.validation_size, cfg.seed)
    X_train, y_train = splits.xy(splits.train)
    X_val, y_val = splits.xy(splits.validation)
    X_test, y_test = splits.xy(splits.test)
    log(f"  split: train {len(X_train)} / validation {len(X_val)} / test {len(X_test)} (stratified, seed {cfg.seed})")

    pipeline = stages.run("fit", lambda: fit_pipeline(X_train, y_train, cfg.seed, cfg.fast, progress=log))
    evaluation = stages.run(
        "evaluate",
        lambda: evaluate(pipeline, X_val, y_val, X_test, y_test),
        lambda e: f"test ROC AUC {e['test']['roc_auc']:.4f}, threshold {e['threshold']:.4f}",
    )
    test_proba = evaluation.pop("_test_proba")

    extra_files: dict[str, bytes] = {}
    compiled_info: dict[str, Any] = {"enabled": False}
    if cfg.compile:
        from models.compiled import CompiledModel
        from models.compiler import compile_pipeline, parity_report

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
        "training_seconds": stages.timings,
    }
    labels = {"framework": "sklearn", "ensemble": "stacking", "stage": cfg.stage}
    model = stages.run(
        "save",
        lambda: save_model(pipeline, metadata, labels, background.to_dict(orient="records"), extra_files),
        lambda m: f"saved {m.tag}",
    )
    report = {"model_tag": str(model.tag), "seed": cfg.seed, "fast": cfg.fast, "evaluation": evaluation, **metadata}
    if cfg.report_dir is not None:
        out = write_report(report, y_test, test_proba, Path(cfg.report_dir))
        log(f"  report: {out / 'report.md'}")
    log(f"total {time.perf_counter() - stages.start:.1f}s")
    return TrainResult(model=model, report=report, pipeline=pipeline, splits=splits)
