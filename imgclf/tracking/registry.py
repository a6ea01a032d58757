"""Promotion through the MLflow model registry: a metric gate, an audit trail, rollback.

Aliases (`models:/NAME@production`), not the deprecated stages. Each move of an alias is
recorded twice: as `audit.*` tags on the version that received it, and in the registered
model's `alias_history.<alias>` tag (a JSON list of versions), which `rollback` walks back.
A file lock per registry serialises promotions from this machine, and the gate is evaluated
inside it, so two promotes at once never leave the alias on a version that failed the gate.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from imgclf.errors import UserError


class GateFailed(Exception):
    """The candidate did not beat the current holder: exit code 1, alias unchanged."""


def lower_is_better(metric: str) -> bool:
    # test_ece: expected calibration error
    return "loss" in metric or "error" in metric or metric.removeprefix("test_").startswith("ece")


@dataclass(frozen=True)
class Decision:
    promoted: bool
    candidate: str
    previous: str | None
    metric: str
    candidate_value: float | None
    previous_value: float | None
    forced: bool
    message: str


def metric_of(client: MlflowClient, name: str, version: str, metric: str) -> float | None:
    """The version's test metric: its registry tag (set by evaluate), else its run's metric."""
    mv = client.get_model_version(name, version)
    if metric in mv.tags:
        return float(mv.tags[metric])
    if mv.run_id:
        try:
            value = client.get_run(mv.run_id).data.metrics.get(metric)
        except MlflowException:
            value = None
        return None if value is None else float(value)
    return None


def holder(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def gate(candidate_value: float | None, previous_value: float | None, metric: str,
         min_delta: float) -> tuple[bool, str]:
    """(passes, why). The candidate must carry the metric and beat the holder by min_delta."""
    if candidate_value is None:
        return False, f"the candidate has no {metric}: run the evaluate stage on it first"
    if previous_value is None:
        return True, f"no current holder with {metric}: the evaluated candidate is promoted"
    gain = (previous_value - candidate_value if lower_is_better(metric)
            else candidate_value - previous_value)
    direction = "lower" if lower_is_better(metric) else "higher"
    if gain > 0 and gain >= min_delta:
        return True, (f"{metric} {candidate_value:.6g} beats {previous_value:.6g} by "
                      f"{gain:.6g} ({direction} is better, min delta {min_delta:g})")
    return False, (f"{metric} {candidate_value:.6g} does not beat the current "
                   f"{previous_value:.6g} by at least {min_delta:g} ({direction} is better)")


def registry_lock(client: MlflowClient) -> FileLock:
    """One lock per registry on this machine, in the temp folder: not in the user's project,
    where `git status` would show it. Portable (filelock), unlike fcntl."""
    key = hashlib.sha256(client._registry_uri.encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"imgclf-registry-{key}.lock")


def _history_key(alias: str) -> str:
    return f"alias_history.{alias}"


def alias_history(client: MlflowClient, name: str, alias: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(_history_key(alias), "[]"))


def _audit(client, name: str, version: str, action: str, alias: str, previous: str | None,
           metric: str, cand: float | None, prev: float | None, reason: str,
           forced: bool) -> None:
    record = {
        "audit.action": action,
        "audit.alias": alias,
        "audit.at": datetime.now(UTC).isoformat(timespec="seconds"),
        "audit.by": os.environ.get("IMGCLF_USER") or getpass.getuser(),
        "audit.from_version": previous or "none",
        "audit.metric": metric,
        "audit.candidate_value": "none" if cand is None else repr(cand),
        "audit.previous_value": "none" if prev is None else repr(prev),
        "audit.reason": reason,
        "audit.forced": str(forced).lower(),
    }
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)


def resolve_version(client: MlflowClient, name: str, version: str | None) -> str:
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        raise UserError(f"cannot read registered model {name!r}: {err}") from None
    if not versions:
        raise UserError(f"no registered model {name!r}: train one first (dvc repro)")
    numbers = sorted(int(v.version) for v in versions)
    if version is None:
        return str(numbers[-1])
    if not str(version).isdigit() or int(version) not in numbers:
        raise UserError(f"{name} has no version {version} (versions: "
                        f"{', '.join(map(str, numbers))})")
    return str(version)


def promote(client: MlflowClient, name: str, version: str | None, alias: str, metric: str,
            min_delta: float, force: bool) -> Decision:
    with registry_lock(client):
        candidate = resolve_version(client, name, version)
        previous = holder(client, name, alias)
        cand_value = metric_of(client, name, candidate, metric)
        prev_value = metric_of(client, name, previous, metric) if previous else None
        if previous == candidate:
            return Decision(False, candidate, previous, metric, cand_value, prev_value, force,
                            f"version {candidate} already holds @{alias}: nothing to do")
        passed, why = gate(cand_value, prev_value, metric, min_delta)
        if not passed and not force:
            raise GateFailed(f"not promoted: {name} version {candidate} -> @{alias}: {why}; "
                             f"@{alias} stays on {previous or 'no version'}")
        reason = why if passed else f"forced past the gate ({why})"
        client.set_registered_model_alias(name, alias, candidate)
        history = alias_history(client, name, alias)
        client.set_registered_model_tag(name, _history_key(alias),
                                        json.dumps([*history, candidate]))
        _audit(client, name, candidate, "promote", alias, previous, metric, cand_value,
               prev_value, reason, forced=not passed)
        return Decision(True, candidate, previous, metric, cand_value, prev_value,
                        not passed, f"promoted {name} version {candidate} to @{alias} "
                                    f"(was {previous or 'none'}): {reason}")


def rollback(client: MlflowClient, name: str, alias: str) -> Decision:
    with registry_lock(client):
        current = holder(client, name, alias)
        history = alias_history(client, name, alias)
        while history and history[-1] != current:
            history.pop()  # moves made outside imgclf: fall back to what we recorded
        if len(history) < 2:
            raise UserError(f"@{alias} of {name} has no previous holder to roll back to")
        target = history[-2]
        client.set_registered_model_alias(name, alias, target)
        client.set_registered_model_tag(name, _history_key(alias), json.dumps(history[:-1]))
        _audit(client, name, target, "rollback", alias, current, "none", None, None,
               f"rollback from version {current}", forced=False)
        return Decision(True, target, current, "none", None, None, False,
                        f"rolled back {name} @{alias}: version {current} -> {target}")


def versions_table(client: MlflowClient, name: str) -> list[dict]:
    try:
        versions = client.search_model_versions(f"name='{name}'")
        aliases = client.get_registered_model(name).aliases
    except MlflowException as err:
        raise UserError(f"cannot read registered model {name!r}: {err}") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        rows.append({
            "version": int(mv.version),
            "aliases": ",".join(sorted(by_version.get(str(mv.version), []))) or "-",
            "test_accuracy": mv.tags.get("test_accuracy", "-"),
            "test_macro_f1": mv.tags.get("test_macro_f1", "-"),
            "test_log_loss": mv.tags.get("test_log_loss", "-"),
            "run_id": mv.run_id,
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime(
                "%Y-%m-%d %H:%M"),
        })
    return rows


def version_card(client: MlflowClient, name: str, version: str | None) -> str:
    """The model card (description) of one version; the newest when `version` is None."""
    version = resolve_version(client, name, version)
    card = client.get_model_version(name, version).description
    return card or f"{name} version {version} has no model card (registered before cards)"


def version_uri(name: str, version: str | int) -> str:
    return f"models:/{name}/{version}"


@contextmanager
def served_model(uri: str) -> Iterator:
    """The registered (or logged) model, loaded as `mlflow models serve` loads it: the
    pyfunc over its own artifacts. They are downloaded to a temporary folder, removed when
    the block ends (MLflow's own download would stay in /tmp)."""
    import mlflow

    from imgclf.tracking import store

    store.use_fluent()
    with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            model = mlflow.pyfunc.load_model(local)
        except (MlflowException, OSError) as err:
            raise UserError(f"cannot load model {uri} from {store.tracking_uri()}: "
                            f"{(str(err).splitlines() or [type(err).__name__])[0]}") from None
        yield model
