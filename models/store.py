"""The BentoML model store: the only link between training and serving."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import bentoml
import joblib
import pandas as pd
from sklearn.pipeline import Pipeline

from models.schema import FEATURE_NAMES, schema_dict

MODEL_NAME = "bank_churn"
PIPELINE_FILE = "pipeline.joblib"
BACKGROUND_FILE = "background.json"
COMPILED_FILE = "pipeline.onnx"  # ONNX Runtime model, saved only when its parity check passed
TRAIN_COMMAND = "python -m training"  # what to run when the store has no model
LIBRARIES = ("scikit-learn", "xgboost", "lightgbm", "numpy", "pandas", "bentoml", "onnx", "onnxruntime")


class ModelLoadError(RuntimeError):
    """The model cannot be served: missing, unreadable, or trained for another schema."""


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = version(lib)
        except Exception:  # not installed: recorded as absent rather than failing a save
            versions[lib] = "absent"
    return versions


def save_model(
    pipeline: Pipeline,
    metadata: dict[str, Any],
    labels: dict[str, str],
    background: pd.DataFrame,
    extra_files: dict[str, bytes] | None = None,
) -> bentoml.Model:
    """Save the fitted pipeline, the explainer's background rows and any extra artifacts
    (e.g. the compiled model) as one versioned entry of the model store."""
    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=metadata) as ref:
        joblib.dump(pipeline, ref.path_of(PIPELINE_FILE), compress=3)
        with open(ref.path_of(BACKGROUND_FILE), "w") as fh:
            json.dump(background[list(FEATURE_NAMES)].to_dict(orient="records"), fh)
        for name, blob in (extra_files or {}).items():
            with open(ref.path_of(name), "wb") as fh:
                fh.write(blob)
    return ref


@dataclass
class ModelBundle:
    """Everything the service needs from one model-store entry."""

    tag: str
    created: str
    pipeline: Pipeline
    metadata: dict[str, Any]
    background: pd.DataFrame
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])


def get_stored(tag: str) -> bentoml.Model:
    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise ModelLoadError(
            f"model '{tag}' is not in the BentoML model store: "
            f"run `{TRAIN_COMMAND}` to train and save it, or set BANKCHURN_MODEL_TAG to a tag listed by "
            f"`bentoml models list`"
        ) from None


def load_bundle(model: bentoml.Model, optional_files: tuple[str, ...] = ()) -> ModelBundle:
    """Load and check a stored model. Raises ModelLoadError with a reason a human can act on."""
    tag = str(model.tag)
    metadata = dict(model.info.metadata)
    saved_schema = metadata.get("feature_schema")
    if saved_schema != schema_dict():
        raise ModelLoadError(
            f"model '{tag}' was trained with a different feature schema than this service expects "
            f"(saved: {_schema_summary(saved_schema)}; service: {_schema_summary(schema_dict())}); "
            f"retrain with `{TRAIN_COMMAND}` or serve a matching model tag"
        )
    if "threshold" not in metadata:
        raise ModelLoadError(
            f"model '{tag}' has no decision threshold in its metadata; retrain it with `{TRAIN_COMMAND}`"
        )
    try:
        pipeline = joblib.load(model.path_of(PIPELINE_FILE))
        with open(model.path_of(BACKGROUND_FILE)) as fh:
            background = pd.DataFrame.from_records(json.load(fh), columns=list(FEATURE_NAMES))
    except Exception as exc:  # any unpickling/IO error means the artifact is unusable
        raise ModelLoadError(
            f"model '{tag}' is unreadable ({type(exc).__name__}: {exc}); retrain it with `{TRAIN_COMMAND}`"
        ) from exc
    if not hasattr(pipeline, "predict_proba"):
        raise ModelLoadError(f"model '{tag}': {PIPELINE_FILE} holds {type(pipeline).__name__}, not a classifier")
    files = {}
    for name in optional_files:
        try:
            with open(model.path_of(name), "rb") as fh:
                files[name] = fh.read()
        except FileNotFoundError:
            pass
    return ModelBundle(
        tag=tag,
        created=model.info.creation_time.isoformat(),
        pipeline=pipeline,
        metadata=metadata,
        background=background,
        files=files,
    )


def _schema_summary(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "none"
    names = [f.get("name") for f in schema.get("features", [])]
    return f"version {schema.get('version')}, features {names}"
