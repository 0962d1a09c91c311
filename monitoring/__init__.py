"""Monitoring jobs: is the served model still the model it was?

    python -m monitoring.drift --since 24h --out DIR        # logged traffic vs the training reference
    python -m monitoring.performance --outcomes FILE --out DIR   # logged predictions vs what happened

Both read the prediction log the service writes (serving.predictionlog), with the service's
own settings (BANKCHURN_PREDICTION_LOG_*), and the reference the training run stored with the
model that served the rows (models.store, REFERENCE_FILE). They write an HTML report for a
person and a JSON one for a machine, and push their figures to a Prometheus Pushgateway when
BANKCHURN_PUSHGATEWAY_URL is set. The `monitoring` extra (Evidently) is theirs alone: the
serving image does not carry it.
"""
