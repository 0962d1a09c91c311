"""The prediction log's record: one scored row.

One record per logged row: when and by which model it was scored, through which route, the
request id (the client's X-Request-Id, or the one generated for it) or the job id and data
row, the row's CustomerId when it carried one, the ten features, the probability and the
decision. Nothing else of a request or an upload is kept.

Two encodings of the same fields, both read back by `decoder()`:
- files: a JSON object per line, keys as below (readable with jq or pandas.read_json(lines=True));
- the Redis stream: a JSON array per entry, values in field order (half the memory of an object).
Fields that do not apply (request_id for a job row, CustomerId when the row had none) are left out.
"""

from __future__ import annotations

import msgspec

from models.schema import FEATURE_NAMES

# A CustomerId longer than this is cut: the log keeps an identifier, not whatever a cell held.
MAX_CUSTOMER_ID = 64


class PredictionRecord(msgspec.Struct, omit_defaults=True, gc=False):
    """A logged prediction. Every field has a default only so that absent ones are left out
    of the encoding; a written record always has the time, model, route, features and outputs.
    Not tracked by the garbage collector (gc=False: its fields are scalars, it can hold no
    cycle): the writer makes thousands a second, and tracking them made the collector's passes
    the writer's largest cost."""

    time: str = ""  # UTC, ISO 8601 with milliseconds: 2026-12-02T07:10:02.114Z (sorts as text)
    model_version: str = ""  # the model-store tag, bank_churn:<version>
    route: str = ""  # /predict, /predict_batch, /explain, /v2/models/bank_churn/infer, /jobs
    request_id: str | None = None
    job_id: str | None = None
    row: int | None = None  # a job: the data row of the upload; /predict_batch and V2: position, from 1
    CustomerId: str | None = None
    CreditScore: int | None = None
    Geography: str | None = None
    Gender: str | None = None
    Age: int | None = None
    Tenure: int | None = None
    Balance: float | None = None
    NumOfProducts: int | None = None
    HasCrCard: int | None = None
    IsActiveMember: int | None = None
    EstimatedSalary: float | None = None
    churn_probability: float | None = None
    will_churn: bool | None = None


class PredictionRow(PredictionRecord, array_like=True):
    """The same record encoded as a JSON array (the Redis stream's entries)."""


FIELDS: tuple[str, ...] = PredictionRecord.__struct_fields__
HEAD = FIELDS[: FIELDS.index(FEATURE_NAMES[0])]  # the fields before the features
OUTPUTS = ("churn_probability", "will_churn")

_ENCODER = msgspec.json.Encoder()


def encode_lines(records: list[PredictionRecord]) -> bytes:
    """JSON lines (objects for PredictionRecord, arrays for PredictionRow), one per record."""
    return _ENCODER.encode_lines(records)


def decoder(record_type: type[PredictionRecord] = PredictionRecord) -> msgspec.json.Decoder:
    """A decoder of one encoding; `.decode_lines(blob)` reads many. Unknown keys are ignored,
    so a newer writer's extra fields do not break an older reader, and an integral float is
    read as an integer (42.0 for Age), as the schema's own column checks accept it."""
    return msgspec.json.Decoder(record_type, strict=False)
