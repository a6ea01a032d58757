"""The `imgclf` command."""

from __future__ import annotations

import argparse
import sys

from imgclf import __doc__ as PACKAGE_DOC


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgclf",
        description=PACKAGE_DOC,
        epilog="The pipeline itself runs with `dvc repro` (see README.md).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo-data", help="write the offline demo dataset (digits) to a folder")
    demo.add_argument("raw_dir", nargs="?", default="data/raw")
    demo.add_argument("--ood", metavar="FOLDER",
                      help="also write images of no digit there (for evaluate.ood_dir)")
    from imgclf.cli import predict, registry, spark_predict

    predict.add_parser(sub)
    spark_predict.add_parser(sub)
    registry.add_parsers(sub)
    sub.add_parser("relog", help="send MLflow what a training kept on disk while the tracking "
                                 "server was lost (models/mlflow_pending.json)")
    ui = sub.add_parser("ui", help="the MLflow UI on the project's store (127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: not exposed to the network)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from imgclf.errors import exits_cleanly

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "predict":
        from imgclf.cli import predict

        return exits_cleanly(predict.run)(args)
    if args.command == "spark-predict":
        from imgclf.cli import spark_predict

        return exits_cleanly(spark_predict.run)(args)
    if args.command in ("promote", "rollback", "models"):
        from imgclf.cli import registry

        return exits_cleanly(getattr(registry, args.command))(args)
    if args.command == "relog":
        from imgclf.cli import relog

        exits_cleanly(relog.main)()
    if args.command == "ui":
        from imgclf.cli import ui

        exits_cleanly(ui.main)(args.host, args.port)
    if args.command == "demo-data":
        from imgclf.data import demo

        demo.main([args.raw_dir, *(["--ood", args.ood] if args.ood else [])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
