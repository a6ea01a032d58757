"""`imgclf promote`, `imgclf rollback`, `imgclf models`: the registry from the command line."""

from __future__ import annotations

import sys
from pathlib import Path


def _model_name(args) -> str:
    if args.name:
        return args.name
    from stages.params import load_params

    return load_params().mlflow.model_name if Path("params.yaml").is_file() else "imgclf"


def _client():
    from stages import tracking

    return tracking.make_client(), tracking.project_root()


def promote(args) -> int:
    from stages import registry

    client, root = _client()
    try:
        decision = registry.promote(client, _model_name(args), args.version, args.alias,
                                    args.metric, args.min_delta, args.force, root)
    except registry.GateFailed as err:
        print(str(err), file=sys.stderr)
        return 1
    print(decision.message)
    if decision.forced:
        print("warning: --force skipped the gate; the audit record says so", file=sys.stderr)
    return 0


def rollback(args) -> int:
    from stages import registry

    client, root = _client()
    print(registry.rollback(client, _model_name(args), args.alias, root).message)
    return 0


def models(args) -> int:
    import pandas as pd

    from stages import registry

    client, _ = _client()
    rows = registry.versions_table(client, _model_name(args))
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
    m = sub.add_parser("models", help="versions with their test metrics and aliases")
    m.add_argument("--name")
