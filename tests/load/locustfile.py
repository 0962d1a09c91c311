"""Locust load profiles for a running BankChurn service (the seeds' smoke/load/stress tests).

Start the service, then run a profile (headless, HTML + CSV reports under reports/load/):

    make serve                                   # in one terminal
    python -m tests.load.run smoke               # 6 users, 30 s
    python -m tests.load.run load                # 50 users, 2 min
    python -m tests.load.run stress              # 100 users, 2 min
    python -m tests.load.run ci --host URL       # 20 users, 15 s (part of the test suite)

Or plain locust: locust -f tests/load/locustfile.py --headless -u 100 -r 20 -t 2m --host http://localhost:3000

Payloads are real customers sampled from the dataset through the shared schema. The run exits
non-zero when any request fails or the overall p95 exceeds --p95-ms.
"""

from __future__ import annotations

import random

import gevent
from locust import FastHttpUser, between, events, task

from models.schema import FEATURE_NAMES, json_customer
from training.data import load_data

CUSTOMERS = [json_customer(r) for r in load_data()[list(FEATURE_NAMES)].sample(2000, random_state=3).to_dict("records")]
# Locust imports this file after gevent's loop has started and sets its -t timer from the loop's
# cached clock: refresh it, or an import slower than the run time (pandas and the dataset: ~19 s
# on a loaded 2-core machine) ends the run before any request.
gevent.get_hub().loop.update_now()


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--p95-ms", type=float, default=2000.0, help="fail the run when overall p95 exceeds this")


@events.quitting.add_listener
def _verdict(environment, **_kwargs):
    total = environment.stats.total
    p95 = total.get_response_time_percentile(0.95) or 0
    bound = environment.parsed_options.p95_ms if environment.parsed_options else 2000.0
    if total.num_failures > 0:
        print(f"FAIL: {total.num_failures} of {total.num_requests} requests failed")
        environment.process_exit_code = 1
    elif p95 > bound:
        print(f"FAIL: p95 {p95:.0f} ms exceeds the bound of {bound:.0f} ms")
        environment.process_exit_code = 1
    else:
        print(f"PASS: {total.num_requests} requests, 0 failures, p95 {p95:.0f} ms <= {bound:.0f} ms")
        environment.process_exit_code = 0


class ChurnClient(FastHttpUser):
    """A client of the churn API: mostly single predictions, some batches, health checks."""

    wait_time = between(0.05, 0.2)

    # Weights: mostly single predictions, some batches, a few explanations (each explanation is
    # ~10,000 model rows: at 1% of requests they already cost about as much as the predictions).
    @task(80)
    def predict(self):
        with self.client.post("/predict", json={"customer": random.choice(CUSTOMERS)}, catch_response=True) as r:
            if r.status_code != 200 or not 0 <= r.json()["churn_probability"] <= 1:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(8)
    def predict_batch(self):
        batch = random.sample(CUSTOMERS, 50)
        with self.client.post("/predict_batch", json={"customers": batch}, catch_response=True) as r:
            if r.status_code != 200 or len(r.json()["predictions"]) != 50:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def explain(self):
        with self.client.post("/explain", json={"customer": random.choice(CUSTOMERS)}, catch_response=True) as r:
            if r.status_code != 200 or "contributions" not in r.json():
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(10)
    def health(self):
        self.client.get("/readyz")
        self.client.get("/livez")
