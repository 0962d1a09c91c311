"""Score customers on Spark with the model from the store: a command and a library call.

    python -m batch.spark --input PATH --output PATH [--model bank_churn:TAG] [--format parquet|csv]
                          [--model-archive URI] [--output-format parquet|csv] [--keep COL ...]
                          [--mode errorifexists|overwrite] [--master URL] [--conf KEY=VALUE ...]

    from batch.spark import score
    scored = score(customers_df, model="bank_churn:TAG")   # a DataFrame you already have

PATH is anything Spark reads and writes (a local path, gs://, s3a://, hdfs://). The output has
CustomerId (when the input has it; --keep names other columns to carry), churn_probability,
will_churn, model_version and error: every input row once, a bad row with its error and null
scores. The model-store entry is exported as an archive and shipped by Spark
(SparkContext.addArchive, what --archives does); on a platform whose driver has no model store
(Dataproc, EMR, Kubernetes), --model-archive names the archive `python -m batch.bundle` wrote.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

from pyspark import SparkFiles
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType

from batch.arrow import DECISION, ERROR, MODEL_VERSION, OUTPUT_FIELDS, PROBABILITY, Scoring, score_batches, type_problem
from batch.shipping import (
    ARCHIVE_SUFFIX,
    ShippedModel,
    UnpackedEntry,
    export_from_store,
    load_shipped,
    read_unpacked,
)
from models.schema import FEATURE_NAMES, ID_COLUMN
from models.store import MODEL_TAG_ENV, ModelLoadError, check_model, served_tag

USE_COMPILED_ENV = "BANKCHURN_USE_COMPILED"  # the same switch as serving's
FORMATS = ("parquet", "csv")
_SPARK_OUTPUT = {PROBABILITY: DoubleType(), DECISION: BooleanType(), MODEL_VERSION: StringType(), ERROR: StringType()}

# PySpark builds mapInArrow on its pandas UDF machinery, which checks (and warns about) pandas on
# the driver even though nothing here converts to pandas; the warning is about conversions only.
warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)


class JobError(ValueError):
    """The job cannot start: a missing or mistyped column, an unusable model. Rows never raise it."""


def use_compiled_default() -> bool:
    return os.environ.get(USE_COMPILED_ENV, "true").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------- the model, shipped by Spark

# Per Spark application: the archives added (URI -> what the driver read and checked), so a
# model is exported, added and checked once however many DataFrames it scores.
_ADDED: dict[tuple[int, str], tuple[str, str, dict, str]] = {}
_EXPORTS: list[Path] = []


def _export_dir() -> Path:
    """One directory per process for exported entries (the same tag exports to the same file);
    removed when the process ends, after Spark has served it to the executors."""
    if not _EXPORTS:
        _EXPORTS.append(Path(tempfile.mkdtemp(prefix="bank-churn-model-")))
        atexit.register(shutil.rmtree, _EXPORTS[0], True)
    return _EXPORTS[0]


def ship_model(
    spark: SparkSession, model: str | None = None, archive: str | None = None, use_compiled: bool = True
) -> ShippedModel:
    """Ship a model to every node of this Spark application (once per model and application).

    `archive`: an exported entry (`python -m batch.bundle` or `bentoml models export`) at any
    URI Spark reads; otherwise `model` (default BANKCHURN_MODEL_TAG, else bank_churn:latest) is
    exported from the local model store. The driver checks the unpacked entry (schema,
    threshold, SHA-256 of every file) before a task runs; each executor checks its copy again.
    """
    context = spark.sparkContext
    if archive is None:
        try:
            path, model = export_from_store(model or served_tag(), _export_dir())
        except ImportError:
            raise JobError(
                "no model store here (BentoML is not installed): pass --model-archive with the archive "
                "`python -m batch.bundle` wrote"
            ) from None
        archive = str(path)
    key = (id(context._jsc), archive)
    if key not in _ADDED:
        name = Path(urlparse(archive).path).name
        if not name.endswith(ARCHIVE_SUFFIX):
            raise JobError(f"--model-archive {archive}: expected a {ARCHIVE_SUFFIX} archive of a model-store entry")
        alias = name[: -len(ARCHIVE_SUFFIX)]
        context.addArchive(f"{archive}#{alias}")
        root = SparkFiles.get(alias)  # Spark unpacks archives on the driver as well
        tag, metadata, created = read_unpacked(root)
        check_model(UnpackedEntry(root, tag, metadata, created))
        _ADDED[key] = (alias, tag, metadata, created)
    alias, tag, metadata, created = _ADDED[key]
    if model and not model.endswith(":latest") and model != tag:
        raise JobError(f"--model {model} was asked for, but the archive {archive} holds {tag}")
    return ShippedModel(tag=tag, alias=alias, created=created, metadata=metadata, prefer_compiled=use_compiled)


def _score_partition(shipped: ShippedModel, keep: tuple[str, ...], empty: str, counters, batches):
    """A mapInArrow task: load the model on this Python worker (once), score each batch."""

    def scoring() -> Scoring:
        return Scoring(load_shipped(shipped, SparkFiles.get(shipped.alias)), shipped.tag, keep, empty)

    rows, failed = counters
    for scored in score_batches(batches, scoring):
        rows.add(scored.num_rows)
        failed.add(scored.num_rows - scored.column(ERROR).null_count)
        yield scored


# ---------------------------------------------------------------- the library call


def check_columns(df: DataFrame) -> None:
    """Refuse, before any task runs, a DataFrame that misses a feature column or holds one of a
    type no row of it could pass (the whole file's problem, as a missing CSV column is for the
    jobs API); values are checked row by row."""
    from pyspark.sql.pandas.types import to_arrow_type

    missing = [name for name in FEATURE_NAMES if name not in df.columns]
    if missing:
        raise JobError(
            f"missing column(s): {', '.join(missing)} (the input has: {', '.join(df.columns[:20]) or 'nothing'}); "
            f"required: {', '.join(FEATURE_NAMES)}"
        )
    problems = []
    for name in FEATURE_NAMES:
        kind = df.schema[name].dataType
        try:
            problem = type_problem(name, to_arrow_type(kind))
        except Exception:  # a Spark type Arrow has no equivalent for (variant, a user-defined type)
            problem = f"column '{name}' is {kind.simpleString()}; it must be numbers or text"
        if problem:
            problems.append(problem)
    if problems:
        raise JobError("; ".join(problems))


def score(
    df: DataFrame,
    model: str | ShippedModel | None = None,
    *,
    archive: str | None = None,
    keep: tuple[str, ...] | list[str] | None = None,
    use_compiled: bool | None = None,
    empty: str = "null",
    counters: tuple | None = None,
) -> DataFrame:
    """Score a DataFrame of customers (the dataset's columns; numbers typed or as text).

    Returns a DataFrame (lazy, like any Spark transformation) with the `keep` columns (default:
    CustomerId when present), churn_probability, will_churn, model_version and error, one row
    per input row. `model` is a store tag (default BANKCHURN_MODEL_TAG, else bank_churn:latest)
    or what ship_model returned; `archive` an exported entry to use instead of the store. `use_compiled` (default
    BANKCHURN_USE_COMPILED, true) serves the ONNX Runtime graph when its parity held at
    training, else the scikit-learn pipeline, as serving does. `empty` names a missing number
    in messages ("an empty cell" for CSV input).
    """
    check_columns(df)
    keep = tuple(dict.fromkeys(keep if keep is not None else ((ID_COLUMN,) if ID_COLUMN in df.columns else ())))
    unknown = [k for k in keep if k not in df.columns]
    clash = [k for k in keep if k in _SPARK_OUTPUT]
    if unknown or clash:
        raise JobError(f"--keep: {', '.join(unknown)} not in the input" if unknown else f"--keep: {clash} are outputs")
    spark = df.sparkSession
    if use_compiled is None:
        use_compiled = use_compiled_default()
    shipped = model if isinstance(model, ShippedModel) else ship_model(spark, model, archive, use_compiled)
    if counters is None:
        counters = (spark.sparkContext.accumulator(0), spark.sparkContext.accumulator(0))
    schema = StructType(
        [df.schema[k] for k in keep] + [StructField(f.name, _SPARK_OUTPUT[f.name], True) for f in OUTPUT_FIELDS]
    )
    needed = list(dict.fromkeys([*keep, *FEATURE_NAMES]))  # only these columns travel to Python
    task = functools.partial(_score_partition, shipped, keep, empty, counters)
    return df.select(*needed).mapInArrow(task, schema)


# ---------------------------------------------------------------- the command


def session(master: str | None = None, conf: dict[str, str] | None = None, app_name: str = "bank-churn-scoring"):
    """The job's SparkSession: spark-submit's when it started this process, else a local one
    whose Python workers run this interpreter (its venv has numpy and ONNX Runtime)."""
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit: Spark starts here, locally
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return builder.getOrCreate()


def read_customers(spark: SparkSession, path: str, fmt: str) -> DataFrame:
    if fmt == "csv":
        # Every cell as text (numbers are parsed and worded like the jobs API's CSV cells); spaces
        # around a cell are formatting, as the jobs API strips them.
        options = {"header": "true", "ignoreLeadingWhiteSpace": "true", "ignoreTrailingWhiteSpace": "true"}
        return spark.read.options(**options).csv(path)
    return spark.read.parquet(path)


def _format_of(path: str) -> str:
    return "csv" if urlparse(path).path.rstrip("/").lower().endswith(".csv") else "parquet"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m batch.spark",
        description="Score customers on Spark with the model from the store (see README: Scoring the whole base on Spark).",
    )
    p.add_argument("--input", required=True, help="customers: a Parquet or CSV path Spark reads (local, gs://, s3a://)")
    p.add_argument("--output", required=True, help="where the scores are written (a directory of part files)")
    p.add_argument("--model", default=None, help=f"model-store tag (default: ${MODEL_TAG_ENV}, else bank_churn:latest)")
    p.add_argument(
        "--format", choices=FORMATS, default=None, help="input format (default: from the path, else parquet)"
    )
    p.add_argument("--output-format", choices=FORMATS, default=None, help="output format (default: --format)")
    p.add_argument(
        "--model-archive", default=None, help="an exported entry (python -m batch.bundle) instead of the store"
    )
    p.add_argument("--keep", nargs="*", default=None, help="input columns carried to the output (default: CustomerId)")
    p.add_argument("--mode", choices=("errorifexists", "overwrite"), default="errorifexists", help="if --output exists")
    p.add_argument("--master", default=None, help="Spark master when not run by spark-submit (default local[*])")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="a Spark setting, repeatable")
    p.add_argument(
        "--use-compiled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"serve the compiled graph when its parity held (default: ${USE_COMPILED_ENV}, else true)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from pyspark.errors import AnalysisException

    args = parser().parse_args(argv)
    conf = dict(item.split("=", 1) for item in args.conf)
    fmt = args.format or _format_of(args.input)
    out_fmt = args.output_format or fmt
    use_compiled = use_compiled_default() if args.use_compiled is None else args.use_compiled
    started = time.monotonic()
    archive, model = args.model_archive, args.model
    if archive is None:  # a model missing from the store fails here, before the JVM starts
        try:
            path, model = export_from_store(model or served_tag(), _export_dir())
        except ModelLoadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except ImportError:
            print("error: no model store here (BentoML is not installed): pass --model-archive", file=sys.stderr)
            return 2
        archive = str(path)
    spark = session(args.master, conf)
    try:
        shipped = ship_model(spark, model, archive, use_compiled)
        customers = read_customers(spark, args.input, fmt)
        rows, failed = spark.sparkContext.accumulator(0), spark.sparkContext.accumulator(0)
        scored = score(
            customers,
            shipped,
            keep=args.keep,
            empty="an empty cell" if fmt == "csv" else "null",
            counters=(rows, failed),
        )
        writer = scored.write.mode(args.mode).format(out_fmt)
        if out_fmt == "csv":
            writer = writer.option("header", "true")
        writer.save(args.output)
    except (JobError, ModelLoadError, AnalysisException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        spark.stop()
    # Accumulators count task attempts: exact unless Spark re-ran a task (then the output still
    # has every row once; only this line counts a re-run partition twice).
    print(
        f"scored {rows.value:,} rows ({failed.value:,} with an error) with {shipped.tag} "
        f"({shipped.backend}) in {time.monotonic() - started:.1f} s -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
