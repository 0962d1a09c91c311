"""The synchronous prediction core: one loaded model, two interchangeable backends.

Everything here is plain blocking code; the service runs it on its inference pool. With the
compiled backend nothing here imports pandas, scikit-learn, XGBoost or LightGBM: they are
imported only when the scikit-learn pipeline serves (no compiled graph, or it is disabled).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.schema import CATEGORICAL_FEATURES, EXAMPLE_CUSTOMER, FEATURE_NAMES, NUMERIC_FEATURES, row_values
from models.store import BACKGROUND_FILE, COMPILED_FILE, PIPELINE_FILE, TRAIN_COMMAND, ModelBundle, ModelLoadError
from models.store import load_bundle as _load_bundle

_EPS = 1e-15  # keeps log-odds finite for probabilities that round to 0 or 1


def log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


class Predictor:
    """Churn probabilities for rows of feature values (tuples in FEATURE_NAMES order).

    Serves the compiled (ONNX Runtime) model when training stored one whose parity with
    the scikit-learn pipeline held on every row; otherwise the scikit-learn pipeline.
    """

    def __init__(self, bundle: ModelBundle, prefer_compiled: bool = True, runtime_threads: int = 1):
        self.bundle = bundle
        self.threshold = bundle.threshold
        self.compiled = None
        compiled_meta = bundle.metadata.get("compiled", {})
        self.backend = "sklearn"
        self.backend_reason = "no compiled model in the model-store entry"
        if prefer_compiled and compiled_meta.get("enabled") and compiled_meta.get("passed"):
            from models.onnx_session import CompiledModel

            blob = bundle.files.get(COMPILED_FILE)
            if blob is not None:
                self.compiled = CompiledModel(blob, threads=runtime_threads)
                self.backend = "onnxruntime"
                self.backend_reason = (
                    f"parity held on {compiled_meta['rows']} rows "
                    f"(max |diff| {compiled_meta['max_abs_diff']:.1e}, "
                    f"{compiled_meta['decision_mismatches']} decision mismatches)"
                )
        elif not prefer_compiled:
            self.backend_reason = "compiled model disabled by configuration"
        elif compiled_meta.get("enabled"):
            self.backend_reason = "compiled model failed its parity check at training time"
        self._prepare_explainer()

    # ------------------------------------------------------------------ predictions

    def predict_rows(self, rows: Sequence[Sequence[Any]]) -> np.ndarray:
        """P(churn) for each row, float64, in input order."""
        if self.compiled is not None:
            return self.compiled.predict_proba_rows(rows)
        return self._sklearn_proba(_frame(rows))

    def predict_columns(self, numeric: np.ndarray, categorical: dict[str, np.ndarray]) -> np.ndarray:
        """P(churn) from validated columns: numeric float64 [n, len(NUMERIC_FEATURES)] in schema
        order, and one object array [n] of strings per categorical feature."""
        if self.compiled is not None:
            return self.compiled.predict_proba_columns(numeric, categorical)
        import pandas as pd

        frame = pd.DataFrame({**dict(zip(NUMERIC_FEATURES, numeric.T, strict=True)), **categorical})
        return self._sklearn_proba(frame[list(FEATURE_NAMES)])

    # ------------------------------------------------------------------ explanations

    def explain(self, row: Sequence[Any]) -> dict[str, Any]:
        """Exact Shapley values of the churn log-odds for one customer.

        The value of a feature subset S is the mean log-odds over the stored background
        customers with the features in S set to this customer's values (interventional
        Shapley). All 2^10 subsets are evaluated, so the contributions are exact, not
        sampled, and they add up: base_value + sum(contributions) == log_odds(p(customer)).
        """
        masks, k = self._masks, len(self._bg_numeric)
        x_num = np.array([row[i] for i in self._num_idx], dtype=np.float64)
        numeric = np.where(masks[:, None, self._num_idx], x_num[None, None, :], self._bg_numeric[None, :, :]).reshape(
            -1, len(self._num_idx)
        )
        categorical = {
            name: np.where(masks[:, None, i], row[i], self._bg_categorical[name][None, :]).reshape(-1)
            for name, i in self._cat_idx.items()
        }
        proba = self.predict_columns(numeric, categorical)
        value = log_odds(proba).reshape(len(masks), k).mean(axis=1)

        # Subset i contains feature j when bit (n-1-j) of i is set (itertools.product order).
        n = len(FEATURE_NAMES)
        phi = np.zeros(n)
        for j in range(n):
            bit = 1 << (n - 1 - j)
            without = self._ids[(self._ids & bit) == 0]
            phi[j] = np.sum(self._weights[self._sizes[without]] * (value[without | bit] - value[without]))

        full, base = value[-1], value[0]
        order = np.argsort(-np.abs(phi), kind="stable")
        return {
            "base_value": float(base),
            "log_odds": float(full),
            "churn_probability": float(1 / (1 + math.exp(-full))),
            "contributions": [
                {"feature": FEATURE_NAMES[j], "value": row[j], "contribution": float(phi[j])} for j in order
            ],
            "method": f"exact interventional Shapley values of the log-odds ({len(masks)} feature subsets, "
            f"{k} background customers)",
        }

    def _prepare_explainer(self) -> None:
        """Everything about explanations that does not depend on the customer, built once."""
        n = len(FEATURE_NAMES)
        self._masks = np.array(list(itertools.product((False, True), repeat=n)), dtype=bool)  # (2^n, n)
        self._ids = np.arange(len(self._masks))
        self._sizes = self._masks.sum(axis=1)
        self._weights = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])
        self._num_idx = [FEATURE_NAMES.index(f) for f in NUMERIC_FEATURES]
        self._cat_idx = {f: FEATURE_NAMES.index(f) for f in CATEGORICAL_FEATURES}
        background = self.bundle.background
        self._bg_numeric = np.array([[r[f] for f in NUMERIC_FEATURES] for r in background], dtype=np.float64)
        self._bg_categorical = {f: np.array([r[f] for r in background], dtype=object) for f in CATEGORICAL_FEATURES}

    def _sklearn_proba(self, frame: Any) -> np.ndarray:
        return self.bundle.pipeline.predict_proba(frame)[:, 1]


def _frame(rows: Sequence[Sequence[Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame.from_records(rows, columns=list(FEATURE_NAMES))


def load_bundle(model: Any, prefer_compiled: bool = True) -> ModelBundle:
    """A checked model-store entry with the files a predictor needs: the compiled graph when
    it is preferred and its parity held, else the scikit-learn pipeline."""
    compiled = model.info.metadata.get("compiled", {})
    if prefer_compiled and compiled.get("enabled") and compiled.get("passed"):
        return _load_bundle(model, need=(COMPILED_FILE, BACKGROUND_FILE))
    return _load_bundle(model, need=(PIPELINE_FILE, BACKGROUND_FILE))


def load_predictor(model: Any, prefer_compiled: bool = True, runtime_threads: int = 1) -> Predictor:
    """Load a stored model, build its predictor and prove it with a warm-up prediction.

    Any failure becomes a ModelLoadError whose message names the model and what to do.
    """
    bundle = load_bundle(model, prefer_compiled)
    if COMPILED_FILE not in bundle.files:
        bundle.pipeline  # noqa: B018 - unpickle it now; its errors are ModelLoadErrors of their own
    try:
        predictor = Predictor(bundle, prefer_compiled, runtime_threads)
        proba = predictor.predict_rows([row_values(EXAMPLE_CUSTOMER)])
    except Exception as exc:  # any failure here means the artifact cannot serve
        raise ModelLoadError(
            f"model '{bundle.tag}' failed its warm-up prediction ({type(exc).__name__}: {exc}); "
            f"retrain it with `{TRAIN_COMMAND}`"
        ) from exc
    if not (proba.shape == (1,) and 0.0 <= float(proba[0]) <= 1.0):
        raise ModelLoadError(
            f"model '{bundle.tag}' returned {proba!r} for the warm-up customer; retrain it with `{TRAIN_COMMAND}`"
        )
    return predictor
