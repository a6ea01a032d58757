"""`imgclf spark-predict`: the registered model over a folder of images, on Spark.

The same answers as `imgclf predict` from the registry (the version's own pyfunc, through
`mlflow.pyfunc.spark_udf`), one row per image file: path, label, confidence, top_k, status,
ood_score, error. SOURCE is anything Spark reads (a local folder, `s3a://...`, `hdfs://...`);
the answers are written as a Parquet (or CSV) folder, as Spark writes them. Needs the `spark`
extra and Java 17+; `--master` names the cluster (default: Spark's local mode on every core).
"""

from __future__ import annotations

import sys
import time

from imgclf.cli.predict import positive_int
from imgclf.errors import UserError


def run(args) -> int:
    from imgclf.params import configured_model_name
    from imgclf.tracking import spark

    spark.require()
    model = args.model or f"models:/{configured_model_name()}@production"
    started = time.monotonic()
    session = spark.session(args.master)
    try:
        answers = spark.score(session, args.source, model, args.top_k, args.batch_size,
                              args.env_manager)
        writer = answers.write.mode("overwrite")
        (writer.option("header", "true").csv if args.format == "csv" else writer.parquet)(
            args.output)
        written = session.read.parquet(args.output) if args.format == "parquet" else \
            session.read.option("header", "true").csv(args.output)
        counts = {row["bad"]: row["count"] for row in
                  written.groupBy((written["error"] != "").alias("bad")).count().collect()}
    finally:
        session.stop()
    good, bad = counts.get(False, 0), counts.get(True, 0)
    if not good + bad:
        raise UserError(f"no image files under {args.source}")
    print(f"spark-predict: {good} image(s) -> {args.output}"
          f"{f' ({bad} unreadable: see the error column)' if bad else ''} [{model}, "
          f"{time.monotonic() - started:.0f} s]", file=sys.stderr)
    if not good:
        print("error: none of the files could be read as an image", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("spark-predict", help="predict a folder of images on Spark "
                                             "(mlflow.pyfunc.spark_udf)", description=__doc__)
    p.add_argument("source", metavar="SOURCE", help="folder (or Spark path) of image files")
    p.add_argument("--output", "-o", required=True, metavar="FOLDER",
                   help="where Spark writes the answers (replaced)")
    p.add_argument("--model", metavar="MODEL",
                   help="default: models:/<mlflow.model_name>@production")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.add_argument("--master", metavar="URL",
                   help="Spark master (local[2], spark://host:7077, yarn); default: "
                        "spark-submit's, else local[*]")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="images per model call on an executor (its memory: N decoded images)")
    p.add_argument("--env-manager", choices=("local", "uv", "virtualenv", "conda"),
                   default="local", help="the executors' Python: local = this one; uv/"
                                         "virtualenv = the model's own, built on each executor")
