"""Batch scoring outside the serving fleet: the Spark job (`python -m batch.spark`) that scores a
whole customer base with the model-store entry, on the executors' Python workers.

Sits on `models` only (the schema, the columnar checks, the store and the predictor), like
`serving` and `training`, and imports neither of them.
"""
