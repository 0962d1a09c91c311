"""`python -m training`: train the churn ensemble and save it to the BentoML model store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.schema import DataValidationError
from training.data import DEFAULT_DATA
from training.decision import CUSTOMER_VALUE, OFFER_COST
from training.evaluate import decision_table, metrics_table
from training.pipeline import DEFAULT_REPORT_DIR, TrainConfig, train
from training.records import PARAMS_FILE


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with the Churn_Modelling columns")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--test-size", type=float, default=0.2, help="held-out test share (default 0.2)")
    p.add_argument("--validation-size", type=float, default=0.16, help="threshold-selection share (default 0.16)")
    p.add_argument("--fast", action="store_true", help="small learners and 3 folds (for tests and smoke runs)")
    p.add_argument(
        "--offer-cost",
        type=float,
        default=OFFER_COST,
        help=f"cost of one retention offer (default {OFFER_COST:g})",
    )
    p.add_argument(
        "--customer-value",
        type=float,
        default=CUSTOMER_VALUE,
        help=f"value of a churner kept by an offer (default {CUSTOMER_VALUE:g}); the served threshold "
        "maximises the expected value of offers on the validation split",
    )
    p.add_argument("--params", type=Path, default=PARAMS_FILE, help="tuned hyperparameters (python -m training.tune)")
    p.add_argument("--default-params", action="store_true", help="train with the untuned defaults")
    p.add_argument("--cv-folds", type=int, help="cross-validation folds when no stored estimate matches (5; fast: 3)")
    p.add_argument("--cv-repeats", type=int, help="cross-validation repeats (3; fast: 1)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the ONNX compiled model")
    p.add_argument("--stage", default="dev", help="model label 'stage' (dev, staging, production)")
    p.add_argument("--report-dir", type=Path, default=DEFAULT_REPORT_DIR)
    p.add_argument("--if-missing", action="store_true", help="do nothing when the store already has the model")
    a = p.parse_args(argv)
    if not 0 < a.test_size < 0.5 or not 0 < a.validation_size < 0.5:
        p.error("--test-size and --validation-size must be in (0, 0.5)")
    if a.offer_cost <= 0 or a.customer_value <= 0:
        p.error("--offer-cost and --customer-value must be positive")
    if (a.cv_folds is not None and a.cv_folds < 2) or (a.cv_repeats is not None and a.cv_repeats < 1):
        p.error("--cv-folds must be at least 2 and --cv-repeats at least 1")
    cfg = TrainConfig(
        data=a.data,
        seed=a.seed,
        test_size=a.test_size,
        validation_size=a.validation_size,
        fast=a.fast,
        compile=a.compile,
        stage=a.stage,
        report_dir=a.report_dir,
        params_file=None if a.default_params else a.params,
        offer_cost=a.offer_cost,
        customer_value=a.customer_value,
        cv_folds=a.cv_folds,
        cv_repeats=a.cv_repeats,
    )
    return cfg, a.if_missing


def main(argv: list[str] | None = None) -> int:
    cfg, if_missing = parse_args(argv)
    if if_missing:
        from models.store import ModelLoadError, get_stored, served_tag

        tag = served_tag()
        try:
            print(f"model store has {get_stored(tag).tag}; not training (drop --if-missing to retrain)")
            return 0
        except ModelLoadError:
            print(f"model store has no '{tag}': training it")
    try:
        result = train(cfg)
    except DataValidationError as exc:
        print(f"error: bad training data: {exc}", file=sys.stderr)
        return 2
    print()
    print(metrics_table(result.report))
    print()
    print(decision_table(result.report["decision"]))
    print(f"\nsaved {result.model.tag}  (inspect: bentoml models get {result.model.tag})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
