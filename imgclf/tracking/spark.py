"""Batch scoring of a registered model on Spark: `mlflow.pyfunc.spark_udf` over image files.

Spark's `binaryFile` source reads each file as a row (`path`, `content`: the bytes); the
registered pyfunc takes those bytes as its `image` column, so the model scores on Spark with
its own code and thresholds, unchanged. Each row gets what `imgclf predict` gives the same
file: label, confidence, status, ood_score, and an `error` instead when the file is not a
readable image. A batch of nothing but broken files answers row by row too
(`reject_unreadable: false`): on Spark one bad partition must not fail the job.

MLflow loads the model once per Python worker and reuses it for every batch that worker
scores. On a cluster, `env_manager="uv"` (or "virtualenv") builds the model's own
environment on each executor from its requirements; "local", the default here, uses the
executors' current Python, as Spark's local mode does.
"""

from __future__ import annotations

from imgclf.data.images import IMAGE_EXTENSIONS

# The struct each row gets: the served model's per-image columns (signature order).
RESULT_TYPE = ("label string, confidence double, top_k string, status string, "
               "ood_score double, error string")
RESULT_FIELDS = ("label", "confidence", "top_k", "status", "ood_score", "error")
# The files `imgclf predict` takes from a folder: image extensions, any case. Hidden files
# (and, by Hadoop's rule, names starting with "_") are skipped by Spark itself.
_IMAGE_PATH = r"(?i)\.(" + "|".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)) + r")$"


def require() -> None:
    """Spark's two prerequisites, as one clear message each: pyspark and a Java runtime."""
    import os
    import shutil

    from imgclf.errors import UserError

    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise UserError("pyspark is not installed: pip install -e '.[spark]'") from None
    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        raise UserError("Spark needs a Java runtime (17 or newer): install one (Debian: "
                        "apt-get install default-jre-headless) or set JAVA_HOME")


def session(master: str | None = None, app: str = "imgclf-score"):
    """A Spark session on `master`. None: the one spark-submit (or a notebook) configured,
    else Spark's local mode on every core."""
    import os
    import sys

    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app)
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit
        master = master or "local[*]"
        builder = builder.master(master)
    if (master or "").startswith("local"):
        # Local workers start $PYSPARK_PYTHON, else `python3` from PATH, which is not this
        # venv's unless it is activated: they would lack the model's libraries.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (builder
            # Arrow moves the bytes to the Python workers in batches, not row by row.
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.ui.enabled", "false")
            .getOrCreate())


def image_files(spark, source: str):
    """Every image file under `source` (recursed) as rows of `path` and `content`."""
    from pyspark.sql import functions as F

    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .load(source))
    return files.where(F.col("path").rlike(_IMAGE_PATH)).select("path", "content")


def score(spark, source: str, model_uri: str, top_k: int = 5, batch_size: int = 32,
          env_manager: str = "local"):
    """A DataFrame of `path` and RESULT_FIELDS: the model's answer for every image file
    under `source`, computed where Spark runs it (lazily, until written or collected).

    `batch_size` images go to the model per call: the pyfunc holds a call's decoded pixels
    at once, and Spark's default Arrow batch (ten thousand rows) of 299 px images would not
    fit an executor's memory.
    """
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    from imgclf.tracking import store

    store.use_fluent()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    predict = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=RESULT_TYPE,
                                      env_manager=env_manager,
                                      params={"top_k": top_k, "reject_unreadable": False})
    answers = image_files(spark, source).withColumn(
        "answer", predict(F.struct(F.col("content").alias("image"))))
    return answers.select("path", *(F.col(f"answer.{name}").alias(name)
                                    for name in RESULT_FIELDS))
