"""The prediction log's writer: a bounded queue and one thread, so logging never slows or
fails a request.

The engine hands over one entry per scored batch (the rows or columns it scored, the
probabilities and decisions, who asked): a deque append, no per-row work on the event loop
or the inference threads. The writer thread wakes every `interval` seconds, samples the rows,
expands each batch into records (msgspec structs built column-wise in C), and writes them.
When more rows wait than `max_rows` (the sink is slow or down), new batches are dropped and
counted; a batch the sink fails to take is dropped and counted too, and the sink is retried
after a pause. Nothing here raises into the caller.
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.schema import BY_NAME, FEATURE_NAMES, NUMERIC_FEATURES
from serving import telemetry
from serving.predictionlog.records import MAX_CUSTOMER_ID
from serving.predictionlog.sinks import iso_time, open_sink

if TYPE_CHECKING:
    import numpy as np

    from serving.settings import Settings

logger = logging.getLogger("bentoml.service.bank_churn.prediction_log")

# Records are encoded and handed to the sink in groups of about this many rows: one write (a
# file append, a Redis round trip) per group, and a backlog never becomes one huge list.
WRITE_ROWS = 8192
_INTEGRAL = {name for name in NUMERIC_FEATURES if BY_NAME[name].kind in ("int", "flag")}
_repeat = itertools.repeat


@dataclass(slots=True)
class Scored:
    """One scored batch, as the engine hands it over. Exactly one of `rows` (tuples in
    FEATURE_NAMES order) and `columns` (numeric [n, len(NUMERIC_FEATURES)] float64 and the
    categorical object arrays) is set. `route` and `request_id` are one value for the whole
    batch, or one per row (coalesced /predict calls)."""

    time: float
    proba: np.ndarray
    decisions: np.ndarray
    route: str | Sequence[str]
    request_id: str | Sequence[str | None] | None = None
    rows: Sequence[tuple] | None = None
    columns: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
    job_id: str | None = None
    row_numbers: Any = None  # a job's data rows, or the positions 1..n in a many-row request
    customer_ids: Sequence[str] | None = None


class PredictionLog:
    """The log of one process: `add` from any thread, written by its own thread."""

    def __init__(
        self,
        sink: Any,
        model_version: str,
        sample: float = 1.0,
        max_rows: int = 100_000,
        interval: float = 0.2,
        retry_s: float = 1.0,
    ):
        self.sink = sink
        self.model_version = model_version
        self.sample = sample
        self.max_rows = max_rows
        self.interval = interval
        self.retry_s = retry_s
        self.enabled = sink is not None and sample > 0
        self._queue: collections.deque[Scored] = collections.deque()
        self._lock = threading.Lock()  # the inference, job and writer threads all move the count
        self.queued_rows = 0  # rows waiting in the queue (read by /metrics)
        self.sink_up = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0
        self._rng = random.Random()

    @classmethod
    def from_settings(cls, settings: Settings, model_version: str) -> PredictionLog:
        sink = open_sink(settings)
        log = cls(sink, model_version, settings.prediction_log_sample, settings.prediction_log_queue_rows)
        if log.enabled:
            logger.info(
                "prediction log: %s of scored rows to %s", f"{settings.prediction_log_sample:.0%}", sink.describe
            )
        return log

    def start(self) -> PredictionLog:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()
        return self

    def add(self, scored: Scored) -> None:
        """Queue a scored batch; dropped (and counted) when too many rows wait already."""
        if not self.enabled:
            return
        n = len(scored.proba)
        with self._lock:
            full = self.queued_rows + n > self.max_rows
            if not full:
                self.queued_rows += n
                self._queue.append(scored)
        if full:
            telemetry.log_dropped("queue_full", n)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued batch is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue or self._busy:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within `timeout`), stop the thread, close the sink."""
        if self._thread is None:
            return
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)
        self._thread = None
        self.sink.close()

    # ------------------------------------------------------------------ the writer thread

    _busy = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        self._busy = True
        try:
            batches = []
            while self._queue:
                batches.append(self._queue.popleft())
            if not batches:
                return
            with self._lock:
                self.queued_rows -= sum(len(scored.proba) for scored in batches)
            records: list[Any] = []
            for scored in batches:
                records += self._records(scored)
                if len(records) >= WRITE_ROWS:  # bounded memory whatever the backlog
                    self._write(records)
                    records = []
            if records:
                self._write(records)
        finally:
            self._busy = False

    def _write(self, records: list[Any]) -> None:
        if time.monotonic() < self._retry_at:  # the sink failed a moment ago: do not wait on it again yet
            telemetry.log_dropped("sink_error", len(records))
            return
        try:
            self.sink.write(records)
        except Exception as exc:
            self._retry_at = time.monotonic() + self.retry_s
            telemetry.log_dropped("sink_error", len(records))
            if self.sink_up:
                logger.warning(
                    "prediction log: %s failed (%s: %s); dropping rows until it is back",
                    self.sink.describe,
                    type(exc).__name__,
                    exc,
                )
            self.sink_up = 0
            return
        if not self.sink_up:
            logger.info("prediction log: %s is back", self.sink.describe)
        self.sink_up = 1
        telemetry.log_written(len(records))

    def _records(self, s: Scored) -> list[Any]:
        """A scored batch's sampled rows as records, built column by column."""
        n = len(s.proba)
        keep = None
        if self.sample < 1:
            keep = [i for i in range(n) if self._rng.random() < self.sample]
            if not keep:
                return []
        if s.rows is not None:
            features = list(zip(*s.rows, strict=True)) if s.rows else [()] * len(FEATURE_NAMES)
        else:
            numeric, categorical = s.columns
            by_name = {}
            for j, name in enumerate(NUMERIC_FEATURES):
                column = numeric[:, j]
                by_name[name] = (column.astype("int64") if name in _INTEGRAL else column).tolist()
            for name, values in categorical.items():
                by_name[name] = values.tolist()
            features = [by_name[name] for name in FEATURE_NAMES]
        proba, decisions = s.proba.tolist(), s.decisions.tolist()
        route = s.route if isinstance(s.route, str) else list(s.route)
        request_id = s.request_id if s.request_id is None or isinstance(s.request_id, str) else list(s.request_id)
        rows = s.row_numbers.tolist() if hasattr(s.row_numbers, "tolist") else s.row_numbers
        ids = [c[:MAX_CUSTOMER_ID] for c in s.customer_ids] if s.customer_ids is not None else None
        columns: list[Any] = [
            _repeat(iso_time(s.time)),
            _repeat(self.model_version),
            route,
            request_id,
            s.job_id,
            rows,
            ids,
            *features,
            proba,
            decisions,
        ]
        if keep is not None:
            columns = [_take(c, keep) for c in columns]
        columns = [_repeat(c) if c is None or isinstance(c, str) else c for c in columns]
        return list(map(self.sink.record_type, *columns))


def _take(column: Any, keep: list[int]) -> Any:
    if column is None or isinstance(column, str | _repeat):
        return column
    return [column[i] for i in keep]
