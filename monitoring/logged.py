"""The logged predictions of a time window, as a DataFrame, read from the service's sink."""

from __future__ import annotations

import operator
import re
import time
from datetime import UTC, datetime

import pandas as pd

from models.schema import BY_NAME, FEATURE_NAMES
from serving.predictionlog.sinks import read_records
from serving.settings import Settings

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """Epoch seconds for '24h', '30m', '7d', '2w' (that long ago) or an ISO 8601 date or time
    (UTC unless it names its zone). Raises ValueError naming the accepted forms."""
    now = time.time() if now is None else now
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _SECONDS[match.group(2)]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (e.g. 30m, 24h, 7d, 2w) nor an ISO 8601 time (e.g. 2026-12-01T00:00Z)"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def load_logged(settings: Settings, since: float, until: float | None, columns: tuple[str, ...]) -> pd.DataFrame:
    """The logged rows of [since, until) with `columns`, typed like the schema (integers as
    int64, categories and repeated strings as pandas categories: a million rows stay small)."""
    getter = operator.attrgetter(*columns)
    frames = []
    for batch in read_records(settings, since, until):
        if batch:
            frame = pd.DataFrame.from_records(map(getter, batch), columns=list(columns))
            frames.append(_typed(frame))
    if not frames:
        return _typed(pd.DataFrame({c: pd.Series(dtype="object") for c in columns}))
    return _typed(pd.concat(frames, ignore_index=True))


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for name in frame.columns:
        feature = BY_NAME.get(name)
        if (feature is not None and feature.kind == "category") or name in ("model_version", "route"):
            frame[name] = frame[name].astype("category")
        elif feature is not None:
            frame[name] = frame[name].astype("int64" if feature.kind in ("int", "flag") else "float64")
    return frame


FEATURES_AND_OUTPUT = (*FEATURE_NAMES, "churn_probability")
