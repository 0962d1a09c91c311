"""Customer files and job submissions built from the real dataset, for tests and benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from harness.servers import ROOT

if TYPE_CHECKING:
    import pandas as pd

DATA = ROOT / "data" / "Churn_Modelling.csv"


def customers_csv(rows: int) -> bytes:
    """A CSV of `rows` real customers: the dataset's rows repeated, each CustomerId made
    unique (it becomes the data row number), other columns as in the dataset. Data row r
    (1-based) is dataset row (r - 1) % 10,000."""
    header, *lines = DATA.read_text().splitlines()
    id_at = header.split(",").index("CustomerId")
    out = [header]
    for r in range(rows):
        fields = lines[r % len(lines)].split(",")  # the dataset has no quoted fields
        fields[id_at] = str(r + 1)
        out.append(",".join(fields))
    return ("\n".join(out) + "\n").encode()


def submit_job(url: str, data: bytes, filename: str = "customers.csv", timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/jobs", files={"file": (filename, data, "text/csv")}, timeout=timeout)


def customers_table(rows: int, seed: int = 0):
    """`rows` customers resampled with replacement (seeded) from the dataset, as a pyarrow Table
    with the dataset's columns and types (integers int64, amounts double, text string), each
    CustomerId unique: data row r (0-based) has CustomerId r + 1. For Parquet inputs of the
    Spark job."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv

    dataset = pyarrow.csv.read_csv(DATA)
    picks = np.random.default_rng(seed).integers(0, dataset.num_rows, size=rows)
    table = dataset.take(pa.array(picks))
    return table.set_column(
        table.schema.get_field_index("CustomerId"), "CustomerId", pa.array(np.arange(1, rows + 1, dtype=np.int64))
    )


def drifted(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The drift scenario's traffic: the same customers with Age + 10 years (within the
    schema's 100) and Geography moved to 70% Germany by relabelling customers, so that their
    other columns keep their distribution."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = frame.copy()
    out["Age"] = np.minimum(out["Age"] + 10, 100)
    not_german = np.flatnonzero(out["Geography"].to_numpy() != "Germany")
    need = round(0.7 * len(out)) - int((out["Geography"] == "Germany").sum())
    out.iloc[rng.choice(not_german, size=need, replace=False), out.columns.get_loc("Geography")] = "Germany"
    return out
