"""The Spark scoring job on a real local Spark (`local[2]`, a JVM and Python workers), over a
Parquet directory of ~200,000 customers resampled from the dataset plus hostile rows:
`python -m batch.spark` as users run it, and the library call on DataFrames.

Exactness: every input row exactly once; the whole file equals the predictor in process to 1e-12
with identical decisions; a sample equals a real `bentoml serve`'s /predict_batch to the bit
(the same 1,000-row batches on both sides); bad rows carry /predict's messages.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batch.shipping import load_shipped, loaded_models
from batch.spark import JobError, read_customers, score, session, ship_model
from harness.data import customers_table
from harness.servers import ROOT
from models.columns import validate_columns
from models.predictor import load_predictor
from models.schema import BY_NAME, FEATURE_NAMES, NUMERIC_FEATURES

pytestmark = pytest.mark.integration

ROWS = 200_000
FILES = 4  # input part files: Spark's partitions, so both cores of local[2] work
AGE = "(allowed: an integer in [18, 100])"
AMOUNT = "(allowed: a number in [0, 1e+07])"

# (overrides of a real customer's row, the error the Spark job must give, or PREDICT: exactly
# what /predict answers for that customer, with "customer." taken off each field).
PREDICT = "as /predict says"
HOSTILE = [
    ({"Age": 150}, PREDICT),
    ({"Geography": "Italy"}, PREDICT),
    # The Parquet's Tenure column is double. The columnar checks (V2, CSV jobs, Spark) word a
    # fraction as pydantic does for JSON input; /predict's hot route says "a valid integer".
    (
        {"Tenure": 2.5},
        "Tenure: Input should be a valid integer, got a number with a fractional part (allowed: an integer in [0, 60])",
    ),
    ({"Gender": None}, PREDICT),
    ({"CreditScore": 10, "Geography": ""}, PREDICT),
    ({"HasCrCard": 2, "NumOfProducts": 0}, PREDICT),
    ({"Balance": None}, f"Balance: Input should be a number, found null {AMOUNT}"),
    ({"Age": None}, f"Age: Input should be an integer, found null {AGE}"),
    ({"EstimatedSalary": math.nan}, f"EstimatedSalary: Input should be a finite number {AMOUNT}"),
    ({"Balance": math.inf}, f"Balance: Input should be a finite number {AMOUNT}"),
]


@pytest.fixture(scope="module")
def customers(tmp_path_factory):
    """(directory of Parquet part files, the whole table, {CustomerId: hostile case index})."""
    table = customers_table(ROWS, seed=20)
    table = table.set_column(
        table.schema.get_field_index("Tenure"), "Tenure", pc.cast(table.column("Tenure"), pa.float64())
    )
    rows = table.slice(0, len(HOSTILE)).to_pylist()
    hostile = {}
    for i, ((overrides, _), row) in enumerate(zip(HOSTILE, rows, strict=True)):
        row.update(overrides, CustomerId=ROWS + 1 + i)
        hostile[row["CustomerId"]] = i
    table = pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)])
    directory = tmp_path_factory.mktemp("customers") / "customers.parquet"
    directory.mkdir()
    per_file = math.ceil(table.num_rows / FILES)
    for k in range(FILES):
        pq.write_table(table.slice(k * per_file, per_file), directory / f"part-{k}.parquet")
    return directory, table, hostile


@pytest.fixture(scope="module")
def cli_run(customers, trained, tmp_path_factory):
    """`python -m batch.spark` over the whole directory, in its own process, as users run it."""
    directory, _, _ = customers
    out = tmp_path_factory.mktemp("scored") / "scores"
    command = [
        sys.executable,
        "-m",
        "batch.spark",
        "--input",
        str(directory),
        "--output",
        str(out),
        "--model",
        str(trained.model.tag),
        "--master",
        "local[2]",
        "--conf",
        "spark.ui.enabled=false",
    ]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return pq.read_table(out), proc.stdout, time.monotonic() - started


@pytest.fixture(scope="module")
def spark():
    """An in-process local[2] session for the library calls (no UI: no fixed port)."""
    conf = {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2"}
    s = session("local[2]", conf, app_name="tests")
    yield s
    s.stop()


def json_customer(row: dict) -> dict:
    """A row as a JSON client sends it: integral values of integer features as integers."""
    out = {n: row[n] for n in FEATURE_NAMES}
    for name in NUMERIC_FEATURES:
        if BY_NAME[name].kind in ("int", "flag") and isinstance(out[name], float) and out[name].is_integer():
            out[name] = int(out[name])
    return out


def reference(table: pa.Table, predictor, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, probabilities of the valid rows): the predictor in process, 10,000 rows a call."""
    columns = {}
    for name in FEATURE_NAMES:
        column = table.column(name)
        if name in NUMERIC_FEATURES:
            columns[name] = pc.fill_null(pc.cast(column, pa.float64()), 0.0).to_numpy()
        else:
            columns[name] = column.to_numpy(zero_copy_only=False)
    checked = validate_columns(columns)
    valid = checked.valid.copy()
    for name in FEATURE_NAMES:
        valid &= ~table.column(name).is_null().to_numpy(zero_copy_only=False)
    numeric = checked.numeric[valid]
    categorical = {n: v[valid] for n, v in checked.categorical.items()}
    proba = np.concatenate(
        [
            predictor.predict_columns(numeric[i : i + chunk], {n: v[i : i + chunk] for n, v in categorical.items()})
            for i in range(0, len(numeric), chunk)
        ]
    )
    return valid, proba


def test_the_command_scores_every_row_once(cli_run, customers, trained):
    scored, stdout, seconds = cli_run
    _, table, hostile = customers
    assert scored.column_names == ["CustomerId", "churn_probability", "will_churn", "model_version", "error"]
    ids = scored.column("CustomerId").to_numpy()
    assert len(ids) == table.num_rows == ROWS + len(HOSTILE)
    assert np.array_equal(np.sort(ids), np.sort(table.column("CustomerId").to_numpy()))  # each once
    assert set(scored.column("model_version").to_pylist()) == {str(trained.model.tag)}
    assert f"scored {table.num_rows:,} rows ({len(hostile)} with an error) with {trained.model.tag}" in stdout
    print(f"python -m batch.spark, {table.num_rows:,} rows, local[2]: {seconds:.1f} s wall (JVM start included)")


def test_the_whole_file_equals_the_predictor(cli_run, customers, trained):
    scored, _, _ = cli_run
    _, table, _ = customers
    predictor = load_predictor(trained.model)
    valid, proba = reference(table, predictor)
    expected = dict(zip(table.column("CustomerId").to_numpy()[valid].tolist(), proba.tolist(), strict=True))
    got = scored.filter(pc.is_valid(scored.column("churn_probability"))).to_pydict()
    assert len(got["CustomerId"]) == len(expected) == ROWS
    assert set(got["CustomerId"]) == set(expected)
    diffs = np.array([abs(p - expected[c]) for c, p in zip(got["CustomerId"], got["churn_probability"], strict=True)])
    assert diffs.max() <= 1e-12, f"max |spark - predictor| = {diffs.max():.3g}"
    decisions = [expected[c] >= predictor.threshold for c in got["CustomerId"]]
    assert got["will_churn"] == decisions
    assert got["error"] == [None] * ROWS
    print(f"{(diffs == 0).mean():.4%} of the rows bit-identical to the predictor in 10,000-row calls")


def test_hostile_rows_carry_their_error_and_no_score(cli_run, customers, server):
    scored, _, _ = cli_run
    _, table, hostile = customers
    bad = scored.filter(pc.is_valid(scored.column("error"))).to_pylist()
    assert {row["CustomerId"] for row in bad} == set(hostile)
    by_id = {row["CustomerId"]: row for row in table.to_pylist()[-len(HOSTILE) :]}
    for row in bad:
        assert row["churn_probability"] is None and row["will_churn"] is None
        overrides, expected = HOSTILE[hostile[row["CustomerId"]]]
        if expected == PREDICT:
            customer = json_customer(by_id[row["CustomerId"]])
            answer = httpx.post(f"{server.url}/predict", json={"customer": customer}, timeout=30)
            assert answer.status_code == 400, answer.text
            expected = answer.json()["error"].replace("customer.", "")
        assert row["error"] == expected, overrides


def test_a_sample_equals_predict_batch_to_the_bit(spark, customers, server, trained, tmp_path):
    """The same 2 x 1,000 rows, in the same batches, through Spark and through the served
    /predict_batch: the same bits, the same decisions and model_version."""
    _, table, _ = customers
    sample = table.slice(1000, 2000)
    path = tmp_path / "sample.parquet"
    pq.write_table(sample, path)  # one small file: one partition, read in file order
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1000")
    try:
        rows = score(read_customers(spark, str(path), "parquet"), str(trained.model.tag)).collect()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    got = {r["CustomerId"]: r for r in rows}
    customers_ = [json_customer(r) for r in sample.to_pylist()]
    served = []
    for i in range(0, len(customers_), 1000):
        answer = httpx.post(f"{server.url}/predict_batch", json={"customers": customers_[i : i + 1000]}, timeout=60)
        assert answer.status_code == 200, answer.text
        served += answer.json()["predictions"]
    for customer_id, prediction in zip(sample.column("CustomerId").to_pylist(), served, strict=True):
        row = got[customer_id]
        assert row["churn_probability"] == prediction["churn_probability"]  # to the bit
        assert row["will_churn"] == prediction["will_churn"]
        assert row["model_version"] == prediction["model_version"] == str(trained.model.tag)


def _probe(shipped, batches):
    """Per batch: which worker process, which loaded predictor, and what that worker imported."""
    from pyspark import SparkFiles

    for _ in batches:
        predictor = load_shipped(shipped, SparkFiles.get(shipped.alias))
        yield pa.RecordBatch.from_pydict(
            {
                "pid": [os.getpid()],
                "predictor": [id(predictor)],
                "loaded": [len(loaded_models())],
                "sklearn": ["sklearn" in sys.modules],
                "bentoml": ["bentoml" in sys.modules],
            }
        )


def test_each_python_worker_loads_the_model_once_without_sklearn_or_bentoml(spark, customers, trained):
    """(pandas is there when installed: pyarrow imports it; the spark-submit test below scores
    with pandas unimportable on the executors.)"""
    import functools

    directory, _, _ = customers
    shipped = ship_model(spark, str(trained.model.tag))
    df = read_customers(spark, str(directory), "parquet").repartition(12)
    score(df, shipped).count()  # the job itself, over 12 partitions
    schema = "pid long, predictor long, loaded long, sklearn boolean, bentoml boolean"
    probes = df.mapInArrow(functools.partial(_probe, shipped), schema).collect()
    by_worker: dict[int, set[int]] = {}
    for probe in probes:
        by_worker.setdefault(probe["pid"], set()).add(probe["predictor"])
        assert not (probe["sklearn"] or probe["bentoml"]), probe
        assert probe["loaded"] == 1
    assert len(probes) >= 12 and 1 <= len(by_worker) <= 2  # local[2]: at most two Python workers
    assert all(len(predictors) == 1 for predictors in by_worker.values()), by_worker


def test_the_pipeline_serves_when_the_compiled_graph_is_off(spark, customers, trained, tmp_path):
    """use_compiled=False (--no-use-compiled, BANKCHURN_USE_COMPILED=false): the scikit-learn
    pipeline on the executors, as serving falls back. (After the load-once test: these workers
    then hold scikit-learn.)"""
    _, table, _ = customers
    sample = table.slice(5000, 1500)
    pq.write_table(sample, tmp_path / "sample.parquet")
    df = read_customers(spark, str(tmp_path / "sample.parquet"), "parquet")
    rows = score(df, str(trained.model.tag), use_compiled=False).collect()
    pipeline = {r["CustomerId"]: r["churn_probability"] for r in rows}
    ids = sample.column("CustomerId").to_pylist()
    _, expected = reference(sample, load_predictor(trained.model, prefer_compiled=False), chunk=len(sample))
    assert max(abs(pipeline[c] - p) for c, p in zip(ids, expected.tolist(), strict=True)) <= 1e-12
    _, compiled = reference(sample, load_predictor(trained.model), chunk=len(sample))
    assert max(abs(pipeline[c] - p) for c, p in zip(ids, compiled.tolist(), strict=True)) <= 1e-6  # training's parity


def test_csv_cells_get_the_jobs_api_answers(spark, trained, tmp_path):
    from serving.jobs.csvfile import score_chunk

    header = ["CustomerId", *FEATURE_NAMES]
    lines = [",".join(header)]
    table = customers_table(300, seed=4)
    for row in table.to_pylist():
        lines.append(",".join(str(row[n]) for n in header))
    hostile = ["forty", "", " 42 ", "nan", "42.5"]  # Age cells: words, empty, padded, NaN, fraction
    for i, age in enumerate(hostile):
        cells = lines[1 + i].split(",")
        cells[header.index("Age")] = age
        cells[header.index("Geography")] = "  Spain "  # spaces around a cell are formatting
        cells[0] = str(1000 + i)
        lines.append(",".join(cells))
    path = tmp_path / "customers.csv"
    path.write_text("\n".join(lines) + "\n")
    df = read_customers(spark, str(path), "csv")
    got = {r["CustomerId"]: r for r in score(df, str(trained.model.tag), empty="an empty cell").collect()}
    records = [line.split(",") for line in lines[1:]]
    chunk = score_chunk(load_predictor(trained.model), header, 1, records, with_id=True)
    predictions = orjson.loads(b"[" + chunk.predictions + b"]")
    errors = orjson.loads(b"[" + chunk.errors + b"]")
    assert len(got) == len(records) == len(predictions) + len(errors)
    for p in predictions:
        assert abs(got[p["CustomerId"]]["churn_probability"] - p["churn_probability"]) <= 1e-12
        assert got[p["CustomerId"]]["will_churn"] == p["will_churn"]
    for e in errors:
        assert got[e["CustomerId"]]["error"] == e["error"] and got[e["CustomerId"]]["churn_probability"] is None
    assert len(errors) == 4  # " 42 " is a number


def test_a_file_no_row_of_which_can_pass_is_refused_before_the_job(spark, trained):
    from pyspark.sql.types import BooleanType, StringType, StructField, StructType

    fields = [StructField(n, StringType()) for n in FEATURE_NAMES if n != "Age"]
    no_age = spark.createDataFrame([], StructType(fields))
    with pytest.raises(JobError, match="missing column\\(s\\): Age"):
        score(no_age, str(trained.model.tag))
    flags = spark.createDataFrame([], StructType([*fields, StructField("Age", BooleanType())]))
    with pytest.raises(JobError, match="column 'Age' is bool; it must be numbers"):
        score(flags, str(trained.model.tag))


def test_the_command_names_a_model_missing_from_the_store(tmp_path):
    command = [sys.executable, "-m", "batch.spark", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    proc = subprocess.run(
        [*command, "--model", "bank_churn:doesnotexist"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "model 'bank_churn:doesnotexist' is not in the BentoML model store" in proc.stderr


def test_the_bundle_runs_under_spark_submit_without_a_model_store(customers, trained, tmp_path):
    """The cloud platforms' way, rehearsed locally: spark-submit with the bundle's main file, its
    code zip as --py-files and the exported entry as --model-archive, BentoML importable nowhere
    (no model store on a Dataproc or EMR driver) and pandas nowhere but the driver."""
    from batch.bundle import bundle

    files = bundle(tmp_path / "dist", str(trained.model.tag))
    blocked = tmp_path / "blocked"
    for name in ("bentoml", "pandas"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f'raise ImportError("no {name} here")\n')
    (tmp_path / "driver").mkdir()
    (tmp_path / "driver" / "bentoml").symlink_to(blocked / "bentoml")
    _, table, _ = customers
    pq.write_table(table.slice(0, 3000), tmp_path / "sample.parquet")
    spark_submit = Path(sys.executable).parent / "spark-submit"
    command = [str(spark_submit), "--master", "local[1]", "--conf", "spark.ui.enabled=false"]
    command += ["--conf", f"spark.executorEnv.PYTHONPATH={blocked}", "--py-files", str(files["code"])]
    command += [str(files["main"]), "--input", str(tmp_path / "sample.parquet"), "--output", str(tmp_path / "out")]
    command += ["--model-archive", str(files["model"])]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    env["PYTHONPATH"] = str(tmp_path / "driver")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"scored 3,000 rows (0 with an error) with {trained.model.tag} (onnxruntime)" in proc.stdout
    scored = pq.read_table(tmp_path / "out")
    assert sorted(scored.column("CustomerId").to_pylist()) == sorted(
        table.slice(0, 3000).column("CustomerId").to_pylist()
    )
