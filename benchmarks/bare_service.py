"""The framework's ceiling: the same request schema as BankChurn.predict, no model.

bentoml serve benchmarks.bare_service:Bare

The answer is a pydantic model, as BankChurn.predict declares: with a plain `dict` return
type BentoML 1.4.39 rebuilds the output's JSON schema for every response (py-spy: ~25% of the
worker's time, ~450 instead of ~800 req/s on one core), which would flatter every comparison.
"""

from __future__ import annotations

import bentoml
from pydantic import BaseModel

from models.schema import Customer


class Answer(BaseModel):
    churn_probability: float
    will_churn: bool
    threshold: float
    model_version: str


@bentoml.service(workers=1)
class Bare:
    @bentoml.api
    async def predict(self, customer: Customer) -> Answer:  # type: ignore[valid-type]
        return Answer(churn_probability=0.5, will_churn=False, threshold=0.5, model_version="bare")
