"""The stacking ensemble: preprocessing and all learners in one scikit-learn Pipeline."""

from __future__ import annotations

from lightgbm import LGBMClassifier
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier, StackingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from xgboost import XGBClassifier

from models.schema import BY_NAME, CATEGORICAL_FEATURES, NUMERIC_FEATURES

BASE_LEARNERS: tuple[str, ...] = ("random_forest", "gradient_boosting", "xgboost", "lightgbm", "logistic")

# Full-size learners (the figures in docs/measurements) and small ones for tests.
_SIZES = {
    "full": {"rf_trees": 200, "rf_depth": 10, "gb_trees": 150, "xgb_trees": 200, "lgbm_trees": 200, "folds": 5},
    "fast": {"rf_trees": 20, "rf_depth": 6, "gb_trees": 20, "xgb_trees": 20, "lgbm_trees": 20, "folds": 3},
}


def build_base_learners(seed: int, fast: bool = False) -> list[tuple[str, object]]:
    """The five base learners, each pinned to one thread so a 1-CPU pod is not oversubscribed."""
    s = _SIZES["fast" if fast else "full"]
    return [
        (
            "random_forest",
            RandomForestClassifier(
                n_estimators=s["rf_trees"], max_depth=s["rf_depth"], min_samples_leaf=2, n_jobs=1, random_state=seed
            ),
        ),
        ("gradient_boosting", GradientBoostingClassifier(n_estimators=s["gb_trees"], max_depth=3, random_state=seed)),
        (
            "xgboost",
            XGBClassifier(
                n_estimators=s["xgb_trees"],
                max_depth=4,
                learning_rate=0.05,
                subsample=0.9,
                colsample_bytree=0.9,
                tree_method="hist",
                n_jobs=1,
                random_state=seed,
                eval_metric="logloss",
            ),
        ),
        (
            "lightgbm",
            LGBMClassifier(
                n_estimators=s["lgbm_trees"],
                learning_rate=0.05,
                num_leaves=15,
                n_jobs=1,
                random_state=seed,
                deterministic=True,
                force_row_wise=True,
                verbose=-1,
            ),
        ),
        # Only the linear learner needs scaled inputs; trees are scale-invariant and see raw
        # values, which also keeps split thresholds exact for the compiled runtime.
        ("logistic", Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression(max_iter=1000))])),
    ]


def build_pipeline(seed: int = 42, fast: bool = False, base_learners: list | None = None) -> Pipeline:
    """Unfitted Pipeline: one-hot encoding of the categories, then the stacking classifier.

    The meta-learner is fitted on out-of-fold base-learner probabilities from stratified folds.
    """
    s = _SIZES["fast" if fast else "full"]
    prep = ColumnTransformer(
        [
            ("num", "passthrough", list(NUMERIC_FEATURES)),
            (
                "cat",
                OneHotEncoder(
                    categories=[list(BY_NAME[c].categories) for c in CATEGORICAL_FEATURES],
                    handle_unknown="error",
                    sparse_output=False,
                ),
                list(CATEGORICAL_FEATURES),
            ),
        ],
        verbose_feature_names_out=False,
    )
    stack = StackingClassifier(
        estimators=base_learners or build_base_learners(seed, fast),
        final_estimator=LogisticRegression(max_iter=1000),
        cv=StratifiedKFold(n_splits=s["folds"], shuffle=True, random_state=seed),
        stack_method="predict_proba",
        n_jobs=1,
    )
    return Pipeline([("prep", prep), ("stack", stack)])
