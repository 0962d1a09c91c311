"""The BentoML model store: the only link between training and serving.

Serving imports this module in the `bentoml serve` arbiter as well as in the worker, so it
imports nothing heavy: the scikit-learn pipeline (joblib, scikit-learn, XGBoost, LightGBM)
is unpickled only when something asks for it (training checks, the scikit-learn fallback).
BentoML itself is imported only by what talks to the store (save, get): the Spark executors
check and load an entry unpacked from an archive, with no BentoML installed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from models.schema import FEATURE_NAMES, schema_dict

if TYPE_CHECKING:
    import bentoml

MODEL_NAME = "bank_churn"
# The tag serving loads unless BANKCHURN_MODEL_TAG names another; `python -m training --if-missing`
# looks for the same one.
MODEL_TAG_ENV = "BANKCHURN_MODEL_TAG"
DEFAULT_MODEL_TAG = f"{MODEL_NAME}:latest"
PIPELINE_FILE = "pipeline.joblib"
BACKGROUND_FILE = "background.json"
COMPILED_FILE = "pipeline.onnx"  # ONNX Runtime model, saved only when its parity check passed
# The drift reference (CSV): the fit split's features and target with the model's out-of-fold
# P(churn); the monitoring jobs read it, serving never does.
REFERENCE_FILE = "reference.csv"
TRAIN_COMMAND = "python -m training"  # what to run when the store has no model
LIBRARIES = ("scikit-learn", "xgboost", "lightgbm", "numpy", "pandas", "bentoml", "onnx", "onnxruntime")


class ModelLoadError(RuntimeError):
    """The model cannot be served: missing, unreadable, or trained for another schema."""


def distribution_version(lib: str) -> str:
    """The installed version of a library, whichever distribution installed it (XGBoost comes
    as `xgboost-cpu` on Linux); "absent" when it is not installed."""
    for name in (lib, f"{lib}-cpu"):
        try:
            return version(name)
        except Exception:
            continue
    return "absent"


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{lib: distribution_version(lib) for lib in LIBRARIES}}


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def save_model(
    pipeline: Any,
    metadata: dict[str, Any],
    labels: dict[str, str],
    background: list[dict[str, Any]],
    extra_files: dict[str, bytes] | None = None,
) -> bentoml.Model:
    """Save the fitted pipeline, the explainer's background customers (records in
    FEATURE_NAMES order) and any extra artifacts (e.g. the compiled model) as one versioned
    entry of the model store. Each file's SHA-256 goes into the metadata (`files`), so a
    server can verify the entry without loading it."""
    import bentoml
    import joblib

    buf = io.BytesIO()
    joblib.dump(pipeline, buf, compress=3)
    files = {
        PIPELINE_FILE: buf.getvalue(),
        BACKGROUND_FILE: json.dumps([{n: r[n] for n in FEATURE_NAMES} for r in background]).encode(),
        **(extra_files or {}),
    }
    metadata = {**metadata, "files": {name: sha256(blob) for name, blob in files.items()}}
    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=metadata) as ref:
        for name, blob in files.items():
            with open(ref.path_of(name), "wb") as fh:
                fh.write(blob)
    return ref


def served_tag() -> str:
    """The tag a server started in this environment serves (BANKCHURN_MODEL_TAG, else latest)."""
    return os.environ.get(MODEL_TAG_ENV) or DEFAULT_MODEL_TAG


def get_stored(tag: str) -> bentoml.Model:
    import bentoml

    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise ModelLoadError(
            f"model '{tag}' is not in the BentoML model store: "
            f"run `{TRAIN_COMMAND}` to train and save it, or set BANKCHURN_MODEL_TAG to a tag listed by "
            f"`bentoml models list`"
        ) from None


@dataclass
class ModelBundle:
    """A checked model-store entry: its metadata and verified files. The scikit-learn
    pipeline is unpickled on first use of `.pipeline` only."""

    tag: str
    created: str
    metadata: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def version(self) -> str:
        return self.tag.split(":", 1)[1]

    @property
    def background(self) -> list[dict[str, Any]]:
        """The explainer's background customers, records in FEATURE_NAMES order."""
        return json.loads(self.files[BACKGROUND_FILE])

    @cached_property
    def pipeline(self) -> Any:
        """The fitted scikit-learn pipeline (imports scikit-learn, XGBoost and LightGBM)."""
        try:
            import joblib

            pipeline = joblib.load(io.BytesIO(self.files[PIPELINE_FILE]))
        except ImportError as exc:
            raise ModelLoadError(
                f"model '{self.tag}': serving its scikit-learn pipeline needs {exc.name}, which this "
                f"install leaves out (the lean image serves the compiled model only); install the "
                f"'sklearn' extra or build the full image (bentofile.full.yaml)"
            ) from exc
        except Exception as exc:  # any unpickling error means the artifact is unusable
            raise ModelLoadError(
                f"model '{self.tag}' is unreadable ({type(exc).__name__}: {exc}); retrain it with `{TRAIN_COMMAND}`"
            ) from exc
        if not hasattr(pipeline, "predict_proba"):
            raise ModelLoadError(
                f"model '{self.tag}': {PIPELINE_FILE} holds {type(pipeline).__name__}, not a classifier"
            )
        return pipeline


def check_model(model: bentoml.Model) -> dict[str, Any]:
    """Cheap checks of a stored entry, without loading it: the feature schema, the threshold,
    and every file against the SHA-256 recorded at training. Returns the metadata; raises
    ModelLoadError with a reason a human can act on."""
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
    recorded = metadata.get("files")
    if not isinstance(recorded, dict) or PIPELINE_FILE not in recorded or BACKGROUND_FILE not in recorded:
        raise ModelLoadError(
            f"model '{tag}' records no file checksums (saved by an older version); retrain it with `{TRAIN_COMMAND}`"
        )
    for name, digest in recorded.items():
        blob = _read(model, name)
        if sha256(blob) != digest:
            raise ModelLoadError(
                f"model '{tag}' is unreadable: {name} does not match the SHA-256 recorded when it was "
                f"saved (the entry is corrupt or was edited); retrain it with `{TRAIN_COMMAND}`"
            )
    return metadata


def load_bundle(model: bentoml.Model, need: tuple[str, ...] | None = None) -> ModelBundle:
    """Check a stored entry and read its files (all recorded files, or only `need`)."""
    metadata = check_model(model)
    names = need if need is not None else tuple(metadata["files"])
    files = {name: _read(model, name) for name in names if name in metadata["files"]}
    files.setdefault(BACKGROUND_FILE, _read(model, BACKGROUND_FILE))
    return ModelBundle(tag=str(model.tag), created=model.info.creation_time.isoformat(), metadata=metadata, files=files)


def _read(model: bentoml.Model, name: str) -> bytes:
    try:
        with open(model.path_of(name), "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ModelLoadError(
            f"model '{model.tag}' is unreadable: {name} is missing ({exc.strerror}); retrain it with `{TRAIN_COMMAND}`"
        ) from None


def _schema_summary(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "none"
    names = [f.get("name") for f in schema.get("features", [])]
    return f"version {schema.get('version')}, features {names}"
