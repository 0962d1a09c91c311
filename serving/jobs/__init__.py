"""Scoring jobs: a CSV of customers scored in the background, shared by every replica.

- csvfile: the sync core: check an upload, cut it into chunks, validate and score a chunk.
- store: where jobs live: Redis (BANKCHURN_REDIS_URL, any replica answers for any job) or an
  embedded in-process store (single replica only).
- delivery: who runs which job: saq workers on Redis (heartbeats; a dead worker's job is taken
  over and resumed from its last checkpoint) or local asyncio workers.
- manager: submit / status / result / cancel, and the worker's run of one job.
- routes: the /jobs HTTP edge.
"""
