"""Calls every BentoML API of a running BankChurn service with BentoML's Python clients.

python examples/client.py --url http://localhost:3000 [--token KEY]

With API keys on (BANKCHURN_API_KEYS_FILE), pass a key with the `predict` scope: --token, or
the BANKCHURN_API_KEY environment variable. (Scoring jobs are plain HTTP routes, not BentoML APIs: see examples/jobs.py.)
"""

from __future__ import annotations

import argparse
import asyncio
import os

import bentoml

CUSTOMER = {
    "CreditScore": 619,
    "Geography": "France",
    "Gender": "Female",
    "Age": 42,
    "Tenure": 2,
    "Balance": 0.0,
    "NumOfProducts": 1,
    "HasCrCard": 1,
    "IsActiveMember": 1,
    "EstimatedSalary": 101348.88,
}


def sync_examples(url: str, token: str | None = None) -> None:
    # token= is sent as `Authorization: Bearer <token>` with every request
    with bentoml.SyncHTTPClient(url, token=token, server_ready_timeout=60, timeout=30) as client:
        p = client.predict(customer=CUSTOMER)
        print(f"predict: p={p['churn_probability']:.4f} will_churn={p['will_churn']} model={p['model_version']}")

        p = client.predict(customer=CUSTOMER, explain=True)
        top = p["explanation"]["contributions"][0]
        print(f"predict+explain: top feature {top['feature']} ({top['contribution']:+.3f} log-odds)")

        batch = client.predict_batch(customers=[CUSTOMER, {**CUSTOMER, "Age": 60, "Geography": "Germany"}])
        print("predict_batch:", [round(x["churn_probability"], 4) for x in batch["predictions"]])

        e = client.explain(customer=CUSTOMER)
        total = e["base_value"] + sum(c["contribution"] for c in e["contributions"])
        print(f"explain: base {e['base_value']:.3f} + contributions = {total:.4f} = log-odds {e['log_odds']:.4f}")

        card = client.model_card()
        print(
            f"model_card: {card['tag']} served by {card['serving_backend']}, ROC AUC {card['metrics']['roc_auc']:.3f}"
        )


async def async_examples(url: str, token: str | None = None) -> None:
    async with bentoml.AsyncHTTPClient(url, token=token, server_ready_timeout=60, timeout=30) as client:
        results = await asyncio.gather(*(client.predict(customer={**CUSTOMER, "Age": age}) for age in (25, 45, 65)))
        print("async predict:", [round(r["churn_probability"], 4) for r in results])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://localhost:3000")
    parser.add_argument("--token", default=os.environ.get("BANKCHURN_API_KEY"), help="an API key (predict scope)")
    args = parser.parse_args()
    sync_examples(args.url, args.token)
    asyncio.run(async_examples(args.url, args.token))
