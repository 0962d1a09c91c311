"""batch/ (the Spark job's executor-side core) without Spark: Arrow batches scored and checked with
/predict's rules, the shipped model checked and loaded once. (tests/test_spark.py runs it on Spark.)"""

from __future__ import annotations

import io
import math
import shutil
import tarfile
import tempfile

import bentoml
import numpy as np
import orjson
import pyarrow as pa
import pytest

from batch.arrow import Scoring, score_batch, score_batches, type_problem
from batch.shipping import ShippedModel, UnpackedEntry, export_from_store, load_shipped, loaded_models, read_unpacked
from models.predictor import load_predictor
from models.schema import EXAMPLE_CUSTOMER, FEATURE_NAMES, row_values
from models.store import COMPILED_FILE, ModelLoadError, check_model
from serving.engine import Engine
from serving.jobs.csvfile import read_chunk, reduce_upload, score_chunk
from serving.settings import Settings

AGE = "(allowed: an integer in [18, 100])"
AMOUNT = "(allowed: a number in [0, 1e+07])"
GEOGRAPHY = "Geography: Input should be 'France', 'Germany' or 'Spain' (allowed: one of 'France', 'Germany', 'Spain')"

# (overrides of a good customer, the row's error): typed columns, as Parquet gives them.
TYPED_CASES = [
    ({"Age": 150}, f"Age: Input should be less than or equal to 100 {AGE}"),
    ({"Age": -(2**62)}, f"Age: Input should be greater than or equal to 18 {AGE}"),
    ({"Geography": "Italy"}, GEOGRAPHY),
    ({"Geography": " France"}, GEOGRAPHY),  # a typed value is taken as it is, as /predict takes it
    ({"Balance": None}, f"Balance: Input should be a number, found null {AMOUNT}"),
    ({"Age": None}, f"Age: Input should be an integer, found null {AGE}"),
    ({"EstimatedSalary": math.nan}, f"EstimatedSalary: Input should be a finite number {AMOUNT}"),
    ({"Balance": math.inf}, f"Balance: Input should be a finite number {AMOUNT}"),
    (
        {"Tenure": 2.5},
        "Tenure: Input should be a valid integer, got a number with a fractional part (allowed: an integer in [0, 60])",
    ),
    ({"Gender": None}, "Gender: Input should be 'Female' or 'Male' (allowed: one of 'Female', 'Male')"),
    ({"HasCrCard": 2}, "HasCrCard: Input should be less than or equal to 1 (allowed: 0 or 1)"),
    (
        {"Geography": "", "CreditScore": 10},  # every problem of the row, in schema order
        "CreditScore: Input should be greater than or equal to 300 (allowed: an integer in [300, 900]); " + GEOGRAPHY,
    ),
]
TYPES = {
    "CreditScore": pa.int64(),
    "Geography": pa.string(),
    "Gender": pa.string(),
    "Age": pa.int64(),
    "Tenure": pa.float64(),  # a double column: a fractional tenure can reach the checks
    "Balance": pa.float64(),
    "NumOfProducts": pa.int32(),
    "HasCrCard": pa.int8(),
    "IsActiveMember": pa.int64(),
    "EstimatedSalary": pa.decimal128(12, 2),
}


@pytest.fixture(scope="module")
def predictor(trained):
    return load_predictor(trained.model)


@pytest.fixture(scope="module")
def scoring(predictor, trained):
    return Scoring(predictor, str(trained.model.tag), keep=("CustomerId",))


def typed_batch(rows: list[dict]) -> pa.RecordBatch:
    columns = {"CustomerId": pa.array(range(1, len(rows) + 1), pa.int64())}
    for name in FEATURE_NAMES:
        kind = TYPES[name]
        values = [row[name] for row in rows]
        finite = all(v is None or isinstance(v, str) or math.isfinite(v) for v in values)
        if pa.types.is_decimal(kind) and finite:  # a decimal has no NaN: such a column is double
            values = [None if v is None else f"{v:.2f}" for v in values]
            columns[name] = pa.array(values, pa.string()).cast(kind)
        elif (pa.types.is_integer(kind) or pa.types.is_decimal(kind)) and any(isinstance(v, float) for v in values):
            columns[name] = pa.array(values, pa.float64())
        else:
            columns[name] = pa.array(values, kind)
    return pa.RecordBatch.from_pydict(columns)


@pytest.mark.parametrize(("overrides", "error"), TYPED_CASES, ids=[str(c[0]) for c in TYPED_CASES])
def test_a_bad_typed_row_gets_its_error_and_the_others_are_scored(scoring, predictor, overrides, error):
    good = dict(EXAMPLE_CUSTOMER)
    bad = {**EXAMPLE_CUSTOMER, **overrides}
    out = score_batch(typed_batch([good, bad, good]), scoring).to_pydict()
    assert out["CustomerId"] == [1, 2, 3]
    assert out["error"] == [None, error, None]
    (expected,) = predictor.predict_rows([row_values(EXAMPLE_CUSTOMER)]).tolist()
    assert out["churn_probability"] == [expected, None, expected]
    assert out["will_churn"] == [expected >= predictor.threshold, None, expected >= predictor.threshold]
    assert out["model_version"] == [scoring.tag] * 3


def test_typed_rows_score_like_the_predictor(scoring, predictor, dataset):
    records = dataset[list(FEATURE_NAMES)].head(2000).to_dict(orient="records")
    out = score_batch(typed_batch(records), scoring).to_pydict()
    expected = predictor.predict_rows([row_values(r) for r in records])
    assert out["churn_probability"] == expected.tolist()  # the same batch: to the bit
    assert out["will_churn"] == (expected >= predictor.threshold).tolist()
    assert out["error"] == [None] * len(records)


# Text cells of one row, as Spark reads a CSV (every column a string).
TEXT_CASES = [
    {"Age": "forty"},
    {"CreditScore": None},  # Spark's CSV reader gives an empty cell as null
    {"Age": "42.5"},
    {"Age": "nan"},
    {"Balance": "1e3", "Age": "42.0"},  # numbers as float() reads them: fine
    {"Geography": "Italy", "HasCrCard": "yes"},
]


@pytest.fixture(scope="module")
def engine(predictor):
    engine = Engine(predictor, Settings(prediction_log_sink="off"))
    yield engine
    engine.shutdown()


def jobs_api_chunk(engine: Engine, header: list[str], row: list[str]):
    """One CSV row as the jobs API scores it: the upload reduced, then its chunk scored."""
    data = (",".join(header) + "\n" + ",".join(row) + "\n").encode()
    with tempfile.TemporaryFile() as out:
        upload = reduce_upload(io.BytesIO(data), 10, 10, out)
        (chunk,) = [read_chunk(upload.chunk(i)) for i in range(len(upload.chunks))]
    return score_chunk(engine, chunk, with_id=False, job_ref="test")


@pytest.mark.parametrize("cells", TEXT_CASES, ids=[str(c) for c in TEXT_CASES])
def test_text_cells_get_the_jobs_api_wording(engine, predictor, cells):
    """The same CSV row through the jobs API's chunk scorer and through the Spark job's batch
    scorer: the same messages (in schema order, as /predict lists them), or the same probability."""
    row = {name: str(EXAMPLE_CUSTOMER[name]) for name in FEATURE_NAMES} | cells
    batch = pa.RecordBatch.from_pydict({name: pa.array([row[name]], pa.string()) for name in FEATURE_NAMES})
    out = score_batch(batch, Scoring(predictor, "bank_churn:test", empty="an empty cell")).to_pylist()[0]
    header = list(FEATURE_NAMES)
    jobs = jobs_api_chunk(engine, header, ["" if row[n] is None else row[n] for n in header])
    if jobs.failed:
        expected = orjson.loads(b"[" + jobs.errors + b"]")[0]["error"].split("; ")
        assert out["error"] == "; ".join(sorted(expected, key=lambda e: FEATURE_NAMES.index(e.split(":")[0])))
        assert out["churn_probability"] is None
    else:
        assert out["error"] is None
        assert out["churn_probability"] == orjson.loads(b"[" + jobs.predictions + b"]")[0]["churn_probability"]


@pytest.mark.parametrize(
    ("name", "kind", "problem"),
    [
        ("Age", pa.int16(), None),
        ("Age", pa.decimal128(5, 0), None),
        ("Age", pa.string(), None),
        ("Balance", pa.float32(), None),
        ("Geography", pa.dictionary(pa.int32(), pa.string()), None),
        ("Age", pa.bool_(), "column 'Age' is bool; it must be numbers"),
        ("Balance", pa.timestamp("s"), "column 'Balance' is timestamp[s]; it must be numbers"),
        ("Geography", pa.int64(), "column 'Geography' is int64; it must be text (one of 'France'"),
    ],
)
def test_a_column_of_the_wrong_type_is_refused_before_the_job(name, kind, problem):
    found = type_problem(name, kind)
    assert found == problem if problem is None else found.startswith(problem)


def test_an_empty_partition_loads_no_model():
    def never():
        raise AssertionError("loaded for an empty partition")

    assert list(score_batches(iter([]), never)) == []


# ---------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def unpacked(trained, tmp_path_factory):
    """The trained entry exported as the job ships it, and unpacked as Spark unpacks it."""
    path, tag = export_from_store(str(trained.model.tag), tmp_path_factory.mktemp("archive"))
    root = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(path) as archive:
        archive.extractall(root, filter="data")
    return root, tag


def test_the_archive_is_the_store_entry(unpacked, trained):
    root, tag = unpacked
    assert tag == str(trained.model.tag)
    found_tag, metadata, created = read_unpacked(root)
    assert found_tag == tag and metadata == dict(bentoml.models.get(tag).info.metadata)
    assert check_model(UnpackedEntry(root, tag, metadata, created)) == metadata


def test_a_worker_loads_a_shipped_model_once(unpacked):
    root, tag = unpacked
    _, metadata, created = read_unpacked(root)
    shipped = ShippedModel(tag=tag, alias="once", created=created, metadata=metadata)
    first = load_shipped(shipped, root)
    assert load_shipped(shipped, root) is first
    assert (tag, "once", True) in loaded_models()
    assert first.backend == "onnxruntime"
    sklearn = load_shipped(ShippedModel(tag, "once", created, metadata, prefer_compiled=False), root)
    assert sklearn.backend == "sklearn" and sklearn is not first


def test_a_tampered_archive_is_refused_on_the_worker(unpacked, tmp_path):
    root, tag = unpacked
    _, metadata, created = read_unpacked(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    blob = bytearray((copy / COMPILED_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (copy / COMPILED_FILE).write_bytes(bytes(blob))
    shipped = ShippedModel(tag=tag, alias="tampered", created=created, metadata=metadata)
    with pytest.raises(ModelLoadError, match=f"{COMPILED_FILE} does not match the SHA-256"):
        load_shipped(shipped, copy)
    assert (tag, "tampered", True) not in loaded_models()


def test_probabilities_are_numbers_in_range(scoring, dataset):
    records = dataset[list(FEATURE_NAMES)].sample(500, random_state=3).to_dict(orient="records")
    out = score_batch(typed_batch(records), scoring)
    proba = out.column("churn_probability").to_numpy()
    assert np.all((proba >= 0) & (proba <= 1))
