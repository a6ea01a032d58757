"""`imgclf promote`, `imgclf rollback`, `imgclf models`: the registry from the command line."""

from __future__ import annotations

import sys


def _model_name(args) -> str:
    from imgclf.params import configured_model_name

    return args.name or configured_model_name()


def _client():
    from imgclf.tracking import store

    return store.make_client()


def promote(args) -> int:
    from imgclf.tracking import registry
    from imgclf.tracking.runs import log_to_entry_run

    # `or None`: `mlflow run -e promote` passes an empty --version for "the newest".
    try:
        decision = registry.promote(_client(), _model_name(args), args.version or None,
                                    args.alias, args.metric, args.min_delta, args.force)
    except registry.GateFailed as err:
        log_to_entry_run({"imgclf.command": "promote", "imgclf.promoted": "false",
                          "imgclf.message": str(err)[:5000]})
        print(str(err), file=sys.stderr)
        return 1
    log_to_entry_run({"imgclf.command": "promote",
                      "imgclf.promoted": str(decision.promoted).lower(),
                      "imgclf.message": decision.message[:5000]})
    print(decision.message)
    if decision.forced:
        print("warning: --force skipped the gate; the audit record says so", file=sys.stderr)
    return 0


def rollback(args) -> int:
    from imgclf.tracking import registry

    print(registry.rollback(_client(), _model_name(args), args.alias).message)
    return 0


def models(args) -> int:
    import pandas as pd

    from imgclf.tracking import registry

    if args.version or args.card:
        print(registry.version_card(_client(), _model_name(args), args.version or None))
        return 0
    rows = registry.versions_table(_client(), _model_name(args))
    print(pd.DataFrame(rows).to_string(index=False) if rows else "no versions")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("promote", help="move an alias (production) to a version, behind a gate")
    p.add_argument("--name", help="registered model (default: mlflow.model_name)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="the candidate version")
    which.add_argument("--latest", action="store_true", help="the newest version (default)")
    p.add_argument("--alias", default="production")
    p.add_argument("--metric", default="test_accuracy",
                   help="gate metric, from evaluate (test_accuracy, test_macro_f1, "
                        "test_log_loss...; a *loss* metric wins when lower)")
    p.add_argument("--min-delta", type=float, default=0.0,
                   help="the candidate must beat the current holder by at least this")
    p.add_argument("--force", action="store_true", help="skip the gate (recorded in the audit)")
    r = sub.add_parser("rollback", help="move an alias back to its previous holder")
    r.add_argument("--name")
    r.add_argument("--alias", default="production")
    m = sub.add_parser("models", help="versions with their test metrics and aliases; with "
                                      "--version or --card, one version's model card")
    m.add_argument("--name")
    m.add_argument("--version", help="print this version's model card")
    m.add_argument("--card", action="store_true", help="print the newest version's model card")
