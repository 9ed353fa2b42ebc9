"""Log a recommender bundle as an MLflow pyfunc model, register it, and promote it through a gate.

    moa register --bundle outputs/bundle --name moa-recommender [--run-id RUN] [--experiment moa-recsys]

The model is logged from code (:mod:`moa.pipelines.recommender_model`, nothing pickled) with the bundle's files
as artifacts, a signature (``history``: list of item ids, ``domain``: str -> ``items``, ``scores``; param ``k``)
and an input example. Each registered version carries its validation NDCG@10 as the tag ``val_ndcg_10``; the
alias ``champion`` moves to the new version only when its NDCG@10 is strictly higher than the current
champion's. The decision and its reason are recorded as version tags (``promotion``, ``promotion_reason``).
A metric that is missing, NaN, infinite or not a number is refused before anything is logged; concurrent
registrations on a local store are serialized by a file lock (:func:`promotion_lock`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import numbers
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from .service import ITEMS_FILE, SERVICE_FILE, bundle_artifacts
from .tracking import resolve_tracking_uri

CHAMPION = "champion"
METRIC = "val/ndcg_10"
METRIC_TAG = "val_ndcg_10"
MODEL_CODE = Path(__file__).with_name("recommender_model.py")


def signature(item_id_type: str) -> ModelSignature:
    """Inputs ``history`` (array of item ids), ``domain``; outputs ``items``, ``scores``; param ``k`` (default 10)."""
    return ModelSignature(
        inputs=Schema([ColSpec(Array(item_id_type), "history"), ColSpec("string", "domain")]),
        outputs=Schema([ColSpec(Array(item_id_type), "items"), ColSpec(Array("double"), "scores")]),
        params=ParamSchema([ParamSpec("k", "long", 10)]),
    )


def input_example(bundle: Path, rows_per_domain: int = 1) -> pd.DataFrame:
    """One short history per domain from the bundle's item table."""
    items = pd.read_parquet(bundle / ITEMS_FILE)
    meta = json.loads((bundle / SERVICE_FILE).read_text())
    cast = int if meta["item_id_type"] == "long" else str
    histories, domains = [], []
    for domain in meta["domains"]:
        ids = items.loc[items["domain"] == domain, "item_id"].head(3 * rows_per_domain).tolist()
        for r in range(rows_per_domain):
            histories.append([cast(i) for i in ids[3 * r:3 * r + 3]])
            domains.append(domain)
    return pd.DataFrame({"history": histories, "domain": domains})


def _requirements() -> list[str]:
    import safetensors
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", f"safetensors=={safetensors.__version__}", "pandas", "pyarrow",
            "moa"]


def log_recommender(bundle: str | Path, *, run_id: str | None = None, experiment: str = "moa-recsys",
                    name: str = "recommender", tracking_uri: str | None = None) -> mlflow.models.model.ModelInfo:
    """Log the bundle as a pyfunc model in run ``run_id`` (or a new run of ``experiment``); returns its info."""
    bundle = Path(bundle)
    meta = json.loads((bundle / SERVICE_FILE).read_text())
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    if run_id is None:
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts=bundle_artifacts(bundle),
            signature=signature(meta["item_id_type"]),
            input_example=(input_example(bundle), {"k": 5}),
            pip_requirements=_requirements(),
            metadata={"domains": meta["domains"], "metrics": meta.get("metrics", {})},
        )


@dataclass
class Promotion:
    name: str
    version: str
    promoted: bool
    reason: str
    metric: float
    champion_version: str | None


def check_metric(metric: Any, what: str = "the gating metric") -> float:
    """``metric`` as a finite float, or a ``ValueError`` saying why it cannot gate a promotion (NaN, infinite,
    missing, or not a number: such a version is refused before anything is logged or registered)."""
    if hasattr(metric, "item") and not isinstance(metric, numbers.Real):  # a one-element tensor or array
        try:
            metric = metric.item()
        except (ValueError, RuntimeError):
            pass
    if metric is None:
        raise ValueError(f"{what} is missing: a version without a metric cannot be gated")
    if isinstance(metric, bool) or not isinstance(metric, numbers.Real):
        raise ValueError(f"{what} must be a number, got {metric!r} ({type(metric).__name__})")
    value = float(metric)
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}: only a finite number can gate a promotion")
    return value


def stored_metric(version) -> float | None:
    """A version's gating metric tag, or ``None`` when it has none usable (then it never blocks a newer version)."""
    try:
        return check_metric(float(version.tags[METRIC_TAG]))
    except (KeyError, TypeError, ValueError):
        return None


def _local_store(uri: str) -> Path | None:
    """The file behind a local store URI (``sqlite:///x.db``, ``file:///dir``, a plain path); ``None`` for servers."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?")[0])
    if uri.startswith("file:"):
        return Path(uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):])
    return None if "://" in uri else Path(uri)


@contextlib.contextmanager
def promotion_lock(registry_uri: str):
    """An exclusive ``flock`` on ``<store>.promotion.lock`` next to a local store (held by one gate at a time across
    processes; the kernel drops it if the holder dies). Yields whether a lock is held (``False`` for a server)."""
    store = _local_store(registry_uri)
    if store is None:
        yield False
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(store.name + ".promotion.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _champion(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_and_gate(model_uri: str, name: str, metric: Any, *, client: MlflowClient | None = None,
                      alias: str = CHAMPION) -> Promotion:
    """Register ``model_uri`` as a new version of ``name`` and move ``alias`` to it only if ``metric`` (validation
    NDCG@10) beats the current holder's; the decision is recorded as version tags.

    The metric is checked first (:func:`check_metric`): a bad one registers nothing. The read-compare-set of the
    alias runs under :func:`promotion_lock` on a local store, so concurrent registrations leave the best version
    as the holder. Against a tracking server (no shared file to lock) it is a compare-and-set loop: after moving
    the alias the gate re-reads it and takes it back from a worse version that overwrote it; a worse gate whose
    stale read is still in flight after the better one's last check can win there (see docs/pipelines.md).
    """
    metric = check_metric(metric)
    client = client or MlflowClient()
    version = str(mlflow.register_model(model_uri, name).version)
    client.set_model_version_tag(name, version, METRIC_TAG, f"{metric:.6f}")
    registry_uri = getattr(client, "_registry_uri", None) or mlflow.get_registry_uri()
    with promotion_lock(registry_uri) as locked:
        current = _champion(client, name, alias)
        best = stored_metric(current) if current is not None else None
        holder = None if current is None else str(current.version)
        if current is None:
            promoted, reason = True, f"first version with a metric: val NDCG@10 {metric:.4f}"
        elif best is None:
            promoted, reason = True, f"val NDCG@10 {metric:.4f}; {alias} v{holder} has no usable metric"
        else:
            promoted = metric > best
            reason = f"val NDCG@10 {metric:.4f} {'>' if promoted else '<='} {alias} v{holder}'s {best:.4f}"
        if promoted:
            _set_alias(client, name, alias, version)
        client.set_model_version_tag(name, version, "promotion", "promoted" if promoted else "rejected")
        client.set_model_version_tag(name, version, "promotion_reason", reason)
    if promoted and not locked:
        _reassert(client, name, alias, version, metric)
    return Promotion(name, version, promoted, reason, metric, holder)


def _reassert(client: MlflowClient, name: str, alias: str, version: str, metric: float, checks: int = 5) -> None:
    """Compare-and-set without a lock: take ``alias`` back while a worse version holds it (a few jittered re-reads)."""
    for _ in range(checks):
        time.sleep(random.uniform(0.05, 0.2))
        current = _champion(client, name, alias)
        held = None if current is None else stored_metric(current)
        if current is not None and str(current.version) != version and held is not None and held >= metric:
            return  # a better (or equal) version holds it: it will defend it
        if current is None or str(current.version) != version:
            _set_alias(client, name, alias, version)


def _set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Set the alias; once more if a concurrent first set of the same alias collided (unique constraint)."""
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException:
        client.set_registered_model_alias(name, alias, version)


def register_bundle(bundle: str | Path, name: str, *, run_id: str | None = None, experiment: str = "moa-recsys",
                    tracking_uri: str | None = None, metric: str = METRIC) -> Promotion:
    """Log, register and gate a bundle in one step (what ``moa register`` does). The bundle's metric is checked
    before anything is logged: a missing, NaN, infinite or non-numeric one leaves no run and no version."""
    bundle = Path(bundle)
    metrics = json.loads((bundle / SERVICE_FILE).read_text()).get("metrics", {})
    if metric not in metrics:
        raise ValueError(f"the bundle's {SERVICE_FILE} has no metric {metric!r} to gate on; it has {sorted(metrics)}")
    value = check_metric(metrics[metric], f"the bundle's {metric}")
    info = log_recommender(bundle, run_id=run_id, experiment=experiment, tracking_uri=tracking_uri)
    return register_and_gate(info.model_uri, name, value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moa register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="serving bundle written by training")
    parser.add_argument("--name", default="moa-recommender", help="registered model name")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run (default: a new run)")
    parser.add_argument("--experiment", default="moa-recsys", help="experiment of the new run")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    args = parser.parse_args(argv)
    if not (args.bundle / SERVICE_FILE).is_file():
        parser.error(f"{args.bundle} is not a serving bundle ({SERVICE_FILE} missing)")
    os.environ.setdefault("MLFLOW_TRACKING_URI", resolve_tracking_uri(args.tracking_uri))
    result = register_bundle(args.bundle, args.name, run_id=args.run_id, experiment=args.experiment,
                             tracking_uri=args.tracking_uri)
    print(json.dumps(asdict(result), indent=2))
    return 0
