"""MLflow at the edge: where the store is, which experiment, what a run is named and tagged.

The store is `MLFLOW_TRACKING_URI` when set (a team server), else the embedded default: a
SQLite file at the project root with artifacts on local disk beside it. `mlflow run` sets
MLFLOW_TRACKING_URI to its own default, `sqlite:///<cwd>/mlflow.db`: from the project root,
that is the embedded store itself, and is treated as such. "Project root" is
`DVC_ROOT` when DVC runs the stage: `dvc exp run --temp/--queue` works in a copy under
`.dvc/tmp/exps/`, and a store path relative to that copy would lose the run.
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from imgclf.data.manifests import data_version
from imgclf.errors import UserError

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# MLflow 3's UI opens experiments without this tag on its GenAI overview; ours is model
# training, so we say so.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
# What a tracking server that went away raises: MLflow's own error once its retries are
# spent, or the connection error itself (requests' errors are OSErrors).
TRACKING_ERRORS = (MlflowException, OSError)


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def _embedded_uri() -> str:
    return f"sqlite:///{project_root() / DB_FILE}"


def uses_embedded_store() -> bool:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return True
    if not uri.startswith("sqlite:///"):
        return False
    return Path(uri.removeprefix("sqlite:///")).resolve() == project_root() / DB_FILE


def tracking_uri() -> str:
    return _embedded_uri() if uses_embedded_store() else os.environ["MLFLOW_TRACKING_URI"]


def check_reachable(timeout: float = 5.0) -> None:
    """Fail in seconds, before any training, when a tracking server does not answer.

    MLflow's own client retries an unreachable server with backoff for minutes; finding out
    after hours of training that nothing can be logged is worse.
    """
    import urllib.error
    import urllib.request

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an auth layer may refuse /health): reachable
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: "
                        f"{reason}. Start it, fix the address, or unset MLFLOW_TRACKING_URI "
                        "to use the project's embedded store") from None


def unusable_message(err: MlflowException) -> str:
    """One line for a store that answers but refuses: say what to set when it is auth."""
    first = (str(err).strip().splitlines() or ["refused"])[0][:300]
    hint = ""
    if err.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or " 401" in str(err) \
            or " 403" in str(err):
        hint = (" (the server asks for credentials: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to an account with EDIT permission)")
    return f"MLflow tracking store {tracking_uri()} is not usable: {first}{hint}"


def use_fluent() -> None:
    """Point MLflow's fluent API (mlflow.pyfunc.log_model / load_model) at the same store as
    `make_client`: runs and the registry in one place."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())


def make_client() -> MlflowClient:
    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def usable_client(experiment: str) -> MlflowClient:
    """A client of a store that answers and lets us write, checked before any heavy work."""
    check_reachable()
    client = make_client()
    try:
        ensure_experiment(client, experiment)
    except MlflowException as err:
        raise UserError(unusable_message(err)) from None
    return client


def ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Embedded store: artifacts beside the database at the project root, by absolute URI, so
    # a run started from a DVC temp copy stores them where the UI will look.
    location = (project_root() / ARTIFACTS_DIR).as_uri() if uses_embedded_store() else None
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG[0]: EXPERIMENT_KIND_TAG[1]})


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path.cwd())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the code that runs; None where this is not a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def run_name(commit: str | None) -> str:
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return exp
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M%S")
    return f"{stamp}-{commit[:7]}" if commit else stamp


def run_tags(commit: str | None, dirty: bool | None,
             source: str = "stages/train.py") -> dict[str, str]:
    # mlflow.source.*: what the runs table's Source column shows (the stage script that made
    # the run); with the git commit beside it, the run names the code that made it.
    tags = {"data_version": data_version(), "mlflow.source.name": source,
            "mlflow.source.type": "LOCAL"}
    if commit:
        tags.update({"git_commit": commit, "git_dirty": str(dirty).lower(),
                     "mlflow.source.git.commit": commit})
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags
