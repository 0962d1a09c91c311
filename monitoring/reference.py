"""The model-store entry of the model that served the logged rows, and its drift reference."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pandas as pd

from models.store import REFERENCE_FILE, ModelBundle, ModelLoadError, get_stored, load_bundle


def _bento_model_store() -> Any:
    """Inside a Bento's image (BENTO_PATH set, as the CronJob runs), the models packed into the
    Bento, as `bentoml serve` reads them; None elsewhere (BentoML's own store is used)."""
    bento_path = os.environ.get("BENTO_PATH")
    if not bento_path or not (Path(bento_path) / "bento.yaml").is_file():
        return None
    from bentoml._internal.bento import Bento

    store = Bento.from_path(bento_path)._model_store
    return store if store is not None and store.list() else None


def model_entry(tag: str) -> ModelBundle:
    """The checked entry (metadata, and the reference file verified against its SHA-256).
    Raises ModelLoadError naming what is missing."""
    import bentoml

    store = _bento_model_store()
    if store is not None:
        try:
            model = bentoml.models.get(tag, _model_store=store)
        except bentoml.exceptions.NotFound:
            raise ModelLoadError(f"model '{tag}' served the logged rows but is not packed in this Bento") from None
    else:
        model = get_stored(tag)
    bundle = load_bundle(model, need=(REFERENCE_FILE,))
    if REFERENCE_FILE not in bundle.files:
        raise ModelLoadError(
            f"model '{tag}' has no drift reference ({REFERENCE_FILE}): it was trained before references were "
            "stored; retrain it with `python -m training`"
        )
    return bundle


def reference_frame(bundle: ModelBundle) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(bundle.files[REFERENCE_FILE]))
