"""The seeds' pattern, for comparison: a sync predict on a 4-thread pool, one DataFrame per
request, the scikit-learn pipeline on a ThreadPoolExecutor(max_workers=4), as the seed documents' fix did.

    bentoml serve benchmarks.seed_service:SeedPattern
"""

from __future__ import annotations

import os

import bentoml
import pandas as pd

from models.schema import Customer
from models.store import MODEL_NAME, get_stored, load_bundle

BUNDLE = load_bundle(get_stored(os.environ.get("BANKCHURN_MODEL_TAG", f"{MODEL_NAME}:latest")))


@bentoml.service(workers=1, threads=4)
class SeedPattern:
    @bentoml.api
    def predict(self, customer: Customer) -> dict:  # type: ignore[valid-type]
        frame = pd.DataFrame([customer.model_dump()])
        p = float(BUNDLE.pipeline.predict_proba(frame)[0, 1])
        return {"churn_probability": p, "will_churn": p >= BUNDLE.threshold, "threshold": BUNDLE.threshold}
