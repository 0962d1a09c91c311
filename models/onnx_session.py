"""The compiled churn pipeline at serving time: an ONNX Runtime session over the graph that
training.onnx_export builds, fed from validated rows. Needs only ONNX Runtime and NumPy, so a
server that serves the compiled model never imports scikit-learn, XGBoost or LightGBM."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from models.schema import BY_NAME, CATEGORICAL_FEATURES, FEATURE_NAMES, NUMERIC_FEATURES

if TYPE_CHECKING:
    import pandas as pd

NUMERIC_INPUT = "numeric"
OUTPUT = "p_churn"
BASE_OUTPUT = "base_proba"

_NUMERIC_INDEX = tuple(FEATURE_NAMES.index(n) for n in NUMERIC_FEATURES)
_CATEGORY_INDEX = tuple(FEATURE_NAMES.index(n) for n in CATEGORICAL_FEATURES)
_GEO, _GENDER = CATEGORICAL_FEATURES  # the row feed is written out for these two


class CompiledModel:
    """ONNX Runtime session over a compiled pipeline. Safe to call from several threads at once.

    With ``threads=1`` (the default) every tree sum runs in its library's order, which is what
    the parity figures are measured with; more threads let ONNX Runtime split the trees between
    threads and add the partial sums, which moves results by a few ulps.
    """

    def __init__(self, onnx_bytes: bytes, threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 4  # errors surface as exceptions, not stderr lines
        # The double->float->double Cast pair in front of the scikit-learn trees is deliberate
        # (lossy); never let the optimizer fold it (off by default, pinned here).
        options.add_session_config_entry("session.enable_cast_chain_elimination", "0")
        self.threads = threads
        self.onnx_bytes = onnx_bytes
        self._session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in self._session.get_inputs()]
        if names != [NUMERIC_INPUT, *CATEGORICAL_FEATURES]:
            raise ValueError(f"not a compiled churn pipeline: inputs {names}")
        self._outputs = [OUTPUT]
        self._numeric = operator.itemgetter(*_NUMERIC_INDEX)
        self._geo, self._gender = _CATEGORY_INDEX  # two categorical features, in schema order
        self._run = self._session.run  # thread-safe; no per-call state in this object

    def _feed_rows(self, rows: Sequence[Sequence]) -> dict[str, np.ndarray]:
        if len(rows) == 1:
            row = rows[0]
            return {
                NUMERIC_INPUT: np.array([self._numeric(row)], dtype=np.float64),
                _GEO: np.array([row[self._geo]], dtype=object),
                _GENDER: np.array([row[self._gender]], dtype=object),
            }
        return {
            NUMERIC_INPUT: np.array([self._numeric(row) for row in rows], dtype=np.float64),
            _GEO: np.array([row[self._geo] for row in rows], dtype=object),
            _GENDER: np.array([row[self._gender] for row in rows], dtype=object),
        }

    @staticmethod
    def _feed_frame(frame: pd.DataFrame) -> dict[str, np.ndarray]:
        feed = {NUMERIC_INPUT: np.ascontiguousarray(frame[list(NUMERIC_FEATURES)].to_numpy(dtype=np.float64))}
        for c in CATEGORICAL_FEATURES:
            feed[c] = frame[c].to_numpy(dtype=object)
        return feed

    def _predict(self, feed: dict[str, np.ndarray], output: list[str]) -> np.ndarray:
        try:
            return self._run(output, feed)[0]
        except Exception as err:
            for c in CATEGORICAL_FEATURES:
                unknown = set(feed[c].tolist()) - set(BY_NAME[c].categories)
                if unknown:
                    raise ValueError(f"{c}: unknown value(s) {sorted(map(str, unknown))}") from err
            raise

    def predict_proba_rows(self, rows: Sequence[Sequence]) -> np.ndarray:
        """P(churn), float64 shape (n,), for validated rows: tuples in FEATURE_NAMES order."""
        if len(rows) == 0:
            return np.empty(0, dtype=np.float64)
        return self._predict(self._feed_rows(rows), self._outputs).ravel()

    def predict_proba_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """P(churn), float64 shape (n,), for a frame with the FEATURE_NAMES columns."""
        if len(frame) == 0:
            return np.empty(0, dtype=np.float64)
        return self._predict(self._feed_frame(frame), self._outputs).ravel()

    def predict_proba_columns(self, numeric: np.ndarray, categorical: dict[str, np.ndarray]) -> np.ndarray:
        """P(churn) from prebuilt columns: numeric float64 [n, len(NUMERIC_FEATURES)] in schema
        order, and one object array [n] per categorical feature (the explainer's fast path)."""
        return self._predict({NUMERIC_INPUT: numeric, **categorical}, self._outputs).ravel()

    def base_probas_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """The meta-learner's inputs, [n, n_learners]: P(1) of each base learner (diagnostics)."""
        return self._predict(self._feed_frame(frame), [BASE_OUTPUT])
