"""The framework's ceiling: the same request schema as BankChurn.predict, no model.

bentoml serve benchmarks.bare_service:Bare
"""

from __future__ import annotations

import bentoml

from models.schema import Customer


@bentoml.service(workers=1)
class Bare:
    @bentoml.api
    async def predict(self, customer: Customer) -> dict:  # type: ignore[valid-type]
        return {"churn_probability": 0.5, "will_churn": False, "threshold": 0.5, "model_version": "bare"}
