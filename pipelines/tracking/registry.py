"""Log any moa bundle as an MLflow pyfunc model, register it, and promote it through a gate.

    moa register --bundle outputs/bundle --name my-classifier [--metric val/accuracy --mode max] [--run-id RUN]

Without ``--run-id`` the model is logged into the fit's run that ``LogBundle`` recorded in the bundle
(``mlflow_run.json``) when the store has it, so the version keeps its lineage; else into a new run of ``moa-<kind>``.

The model is logged from code (:mod:`moa.pipelines.tracking.pyfunc_model`, nothing pickled) with the bundle folder as its
one artifact, the signature and an input example of its kind (:mod:`moa.pipelines.bundle`), and requirements
that pin the moa version that wrote it. Each registered version carries its gating metric as tags
(``gate_metric``, ``gate_mode``, ``gate_value``: the value's ``repr``, compared exactly); the alias ``champion``
moves to the new version only when its value is strictly better (higher for ``max``, lower for ``min``) than
the current champion's. The decision and its reason are recorded as version tags (``promotion``,
``promotion_reason``). A metric that is missing, NaN, infinite or not a number is refused before anything is
logged, and so is a gate on another metric than the champion's; concurrent registrations on a local store are
serialized by a file lock (:func:`promotion_lock`).
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
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import mlflow
from mlflow import MlflowClient

from moa.experts.errors import UserError
import moa
from moa.atomic import atomic_file, readable
from mlflow.exceptions import MlflowException

from moa.pipelines.bundle import bundle_meta, default_gate, signature_and_example
from moa.pipelines.tracking.store import resolve_tracking_uri

CHAMPION = "champion"
METRIC_TAG, METRIC_NAME_TAG, MODE_TAG = "gate_value", "gate_metric", "gate_mode"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
RUN_FILE = "mlflow_run.json"  # beside service.json: the MLflow run of the fit that wrote the bundle (LogBundle)


def record_run(bundle: str | Path, run_id: str) -> Path:
    """Write ``mlflow_run.json`` (``{"run_id": ...}``) into the bundle folder: the fit's run, which ``moa register``
    without ``--run-id`` logs the model into (its lineage). Not the tracking URI: it may hold credentials, and the
    bundle is shipped. Outside the bundle's manifest; a new bundle written into the folder drops it."""
    path = Path(bundle) / RUN_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"run_id": run_id}))
    return path


def recorded_run(bundle: str | Path) -> str | None:
    """The run id in the bundle's ``mlflow_run.json``, or ``None`` when it has none (or an unreadable one)."""
    try:
        run_id = json.loads((Path(bundle) / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


def _fit_run(bundle: str | Path, client: MlflowClient) -> str | None:
    """The fit's run recorded in the bundle when the store has it (not deleted); else ``None``, with a note."""
    run_id = recorded_run(bundle)
    if run_id is None:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        warnings.warn(f"the bundle's fit run {run_id} ({RUN_FILE}) is not in the store "
                      f"{mlflow.get_tracking_uri()}: the model is logged to a new run (pass --run-id to choose one)",
                      stacklevel=3)
        return None
    return run_id


def _requirements() -> list[str]:
    import safetensors
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", f"safetensors=={safetensors.__version__}", "pandas", "pyarrow",
            f"moa=={moa.__version__}"]


def log_bundle(bundle: str | Path, *, run_id: str | None = None, experiment: str | None = None,
               name: str = "model", tracking_uri: str | None = None) -> mlflow.models.model.ModelInfo:
    """Log the bundle as a pyfunc model in run ``run_id`` (or a new run of ``experiment``, by default
    ``moa-<kind>``); returns its info."""
    bundle = readable(bundle)
    meta = bundle_meta(bundle)
    model_signature, example = signature_and_example(bundle)
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    if run_id is None:
        mlflow.set_experiment(experiment or f"moa-{meta['kind']}")
    else:  # the run's own experiment: one set earlier in this process (another register) would refuse the run
        mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    names = {key: meta[key] for key in ("tasks", "domains", "labels") if key in meta}
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={"bundle": str(bundle)},
            signature=model_signature,
            input_example=example,
            pip_requirements=_requirements(),
            metadata={"kind": meta["kind"], "moa_version": moa.__version__, **names, "metrics": meta.get("metrics", {})},
        )


@dataclass
class Promotion:
    name: str
    version: str
    promoted: bool
    reason: str
    metric: float
    champion_version: str  # the alias's holder after the decision: this version when promoted
    previous_champion: str | None  # the holder it was compared with (None: there was none)


def check_metric(metric: Any, what: str = "the gating metric") -> float:
    """``metric`` as a finite float, or a ``ValueError`` saying why it cannot gate a promotion (NaN, infinite,
    missing, or not a number: such a version is refused before anything is logged or registered)."""
    if hasattr(metric, "item") and not isinstance(metric, numbers.Real):  # a one-element tensor or array
        try:
            metric = metric.item()
        except (ValueError, RuntimeError):
            pass
    if metric is None:
        raise UserError(f"{what} is missing: a version without a metric cannot be gated")
    if isinstance(metric, bool) or not isinstance(metric, numbers.Real):
        raise UserError(f"{what} must be a number, got {metric!r} ({type(metric).__name__})")
    value = float(metric)
    if not math.isfinite(value):
        raise UserError(f"{what} is {value}: only a finite number can gate a promotion")
    return value


def stored_metric(version) -> float | None:
    """A version's gating value tag (exact; older moa wrote it rounded to 6 digits), or ``None`` when it has none
    usable (then it never blocks a newer version)."""
    try:
        return check_metric(float(version.tags[METRIC_TAG]))
    except (KeyError, TypeError, ValueError):
        return None


def better(value: float, than: float, mode: str) -> bool:
    """Whether ``value`` is strictly better than ``than`` under ``mode`` (``max`` or ``min``)."""
    return value > than if mode == "max" else value < than


def _check_mode(mode: str) -> str:
    if mode not in ("max", "min"):
        raise UserError(f"the gate's mode must be 'max' (accuracy, NDCG) or 'min' (loss, perplexity), got {mode!r}")
    return mode


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


MODEL_URI = re.compile(r"models:/([^/@]+)(?:/([^/@]+)|@([^/@]+))/?")
SHOWN_NAMES = 20  # registered names listed in an error


def registered_version(uri: str, client: MlflowClient | None = None):
    """The model version that ``models:/<name>/<version>`` (or ``/latest``) or ``models:/<name>@<alias>`` names;
    a one-line :class:`UserError` naming what the registry lacks: the model (with the names it has), the version
    (with the model's versions) or the alias (with the model's aliases)."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise UserError(f"model URI {uri!r}: write models:/<name>/<version> or models:/<name>@<alias>")
    name, number, alias = match.groups()
    client = client or MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=SHOWN_NAMES + 1))
        shown = ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "") if names else "none"
        raise UserError(f"{uri}: no registered model {name!r} in this MLflow store (registered: {shown})") from None
    versions = sorted((v for v in client.search_model_versions(f"name='{name}'")), key=lambda v: int(v.version))
    if alias is not None:
        if alias not in model.aliases:
            held = ", ".join(f"@{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
            raise UserError(f"{uri}: model {name!r} has no alias @{alias} (its aliases: {held}; versions: "
                            f"{[int(v.version) for v in versions]})")
        number = str(model.aliases[alias])
    elif number == "latest" and versions:
        number = str(versions[-1].version)
    found = next((v for v in versions if str(v.version) == number), None)
    if found is None:
        raise UserError(f"{uri}: model {name!r} has no version {number} (its versions: "
                        f"{[int(v.version) for v in versions] or 'none'})")
    return found


def check_model_uri(uri: str, tracking_uri: str | None = None) -> None:
    """:func:`registered_version` of a ``models:/`` URI in the store of ``tracking_uri`` (resolved as everywhere),
    before anything loads it (MLflow's own error is a long traceback); other URIs (``runs:/``, a path) are
    MLflow's to check."""
    if uri.startswith("models:/"):
        registered_version(uri, MlflowClient(resolve_tracking_uri(tracking_uri)))


def _champion(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_and_gate(model_uri: str, name: str, metric: Any, *, metric_name: str = "val/ndcg_10",
                      mode: str = "max", client: MlflowClient | None = None, alias: str = CHAMPION) -> Promotion:
    """Register ``model_uri`` as a new version of ``name`` and move ``alias`` to it only if ``metric`` (the value
    of ``metric_name``) beats the current holder's under ``mode``; the decision is recorded as version tags.

    The metric is checked first (:func:`check_metric`), and so is the gate against the holder's (a champion gated
    on another metric or direction cannot be compared): either failure registers nothing. The
    read-compare-set of the alias runs under :func:`promotion_lock` on a local store, so concurrent
    registrations leave the best version as the holder. Against a tracking server (no shared file to lock) it
    is a compare-and-set loop: after moving the alias the gate re-reads it and takes it back from a worse version
    that overwrote it; a worse gate whose stale read is still in flight after the better one's last check can win
    there (see docs/pipelines.md). The version is registered by ``mlflow.register_model`` in
    ``mlflow.get_registry_uri()``, the registry that is locked; ``client`` must reach that registry too.
    """
    metric, mode = check_metric(metric), _check_mode(mode)
    client = client or MlflowClient()
    _check_same_gate(_champion(client, name, alias), name, metric_name, mode)
    version = str(mlflow.register_model(model_uri, name).version)
    for key, value in ((METRIC_NAME_TAG, metric_name), (MODE_TAG, mode), (METRIC_TAG, repr(metric))):
        client.set_model_version_tag(name, version, key, value)
    registry_uri = mlflow.get_registry_uri()  # where mlflow.register_model registered it
    shown = f"{metric_name} {metric:.4f}"
    with promotion_lock(registry_uri) as locked:
        current = _champion(client, name, alias)
        best = stored_metric(current) if current is not None else None
        holder = None if current is None else str(current.version)
        if current is None:
            promoted, reason = True, f"first version with a metric: {shown}"
        elif best is None:
            promoted, reason = True, f"{shown}; {alias} v{holder} has no usable metric"
        else:
            promoted = better(metric, best, mode)
            sign = (">" if mode == "max" else "<") if promoted else ("<=" if mode == "max" else ">=")
            values = (f"{metric:.4f}", f"{best:.4f}")
            values = (repr(metric), repr(best)) if values[0] == values[1] and metric != best else values
            reason = f"{metric_name} {values[0]} {sign} {alias} v{holder}'s {values[1]} ({mode})"
        if promoted:
            _set_alias(client, name, alias, version)
        client.set_model_version_tag(name, version, "promotion", "promoted" if promoted else "rejected")
        client.set_model_version_tag(name, version, "promotion_reason", reason)
    if promoted and not locked:
        _reassert(client, name, alias, version, metric, mode)
    return Promotion(name, version, promoted, reason, metric, version if promoted else holder, holder)


def _check_same_gate(champion, name: str, metric_name: str, mode: str) -> None:
    if champion is None:
        return
    held = (champion.tags.get(METRIC_NAME_TAG, "val/ndcg_10"), champion.tags.get(MODE_TAG, "max"))
    if held != (metric_name, mode):
        raise UserError(f"{name}'s champion v{champion.version} was gated on {held[0]} ({held[1]}); this version "
                         f"on {metric_name} ({mode}): gate on the same metric to compare them")


def _reassert(client: MlflowClient, name: str, alias: str, version: str, metric: float, mode: str,
              checks: int = 5) -> None:
    """Compare-and-set without a lock: take ``alias`` back while a worse version holds it (a few jittered re-reads)."""
    for _ in range(checks):
        time.sleep(random.uniform(0.05, 0.2))
        current = _champion(client, name, alias)
        held = None if current is None else stored_metric(current)
        if current is not None and str(current.version) != version and held is not None and not better(metric, held, mode):
            return  # a better (or equal) version holds it: it will defend it
        if current is None or str(current.version) != version:
            _set_alias(client, name, alias, version)


def _set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Set the alias; once more if a concurrent first set of the same alias collided (unique constraint)."""
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException:
        client.set_registered_model_alias(name, alias, version)


def register_bundle(bundle: str | Path, name: str, *, metric: str | None = None, mode: str | None = None,
                    run_id: str | None = None, experiment: str | None = None,
                    tracking_uri: str | None = None) -> Promotion:
    """Log, register and gate a bundle in one step (what ``moa register`` does). ``metric`` / ``mode`` default to
    the kind's gate (:func:`moa.pipelines.bundle.default_gate`). The bundle's metric and the gate are checked
    before anything is logged: a missing, NaN, infinite or non-numeric metric leaves no run and no version.
    Without ``run_id`` the model is logged into the fit's run recorded in the bundle (``mlflow_run.json``, written by
    :class:`~moa.pipelines.tracking.log_bundle.LogBundle`) when the store has it, else into a new run of
    ``experiment``."""
    meta = bundle_meta(bundle)
    metric = metric or default_gate(meta["kind"])[0]
    mode = _check_mode(mode or default_gate(meta["kind"])[1])
    metrics = meta.get("metrics", {})
    if metric not in metrics:
        raise UserError(f"the bundle's service.json has no metric {metric!r} to gate on; it has {sorted(metrics)}")
    value = check_metric(metrics[metric], f"the bundle's {metric}")
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    client = MlflowClient()
    _check_same_gate(_champion(client, name, CHAMPION), name, metric, mode)
    if run_id is None:
        run_id = _fit_run(bundle, client)
    info = log_bundle(bundle, run_id=run_id, experiment=experiment, tracking_uri=tracking_uri)
    return register_and_gate(info.model_uri, name, value, metric_name=metric, mode=mode)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moa register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="serving bundle written by training")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--metric", default=None, help="the gating metric in the bundle's service.json (default: "
                        "the kind's: val/ndcg_10 for recommenders, val/accuracy for classifiers, val/loss for LMs)")
    parser.add_argument("--mode", choices=("max", "min"), default=None, help="higher or lower is better "
                        "(default: the kind's)")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run "
                        "(default: the fit's run recorded in the bundle's mlflow_run.json, else a new run)")
    parser.add_argument("--experiment", default=None, help="experiment of a new run (default: moa-<kind>)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    args = parser.parse_args(argv)
    try:
        bundle_meta(args.bundle)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    os.environ.setdefault("MLFLOW_TRACKING_URI", resolve_tracking_uri(args.tracking_uri))
    result = register_bundle(args.bundle, args.name, metric=args.metric, mode=args.mode, run_id=args.run_id,
                             experiment=args.experiment, tracking_uri=args.tracking_uri)
    print(json.dumps(asdict(result), indent=2))
    return 0
