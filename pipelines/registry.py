"""Log a recommender bundle as an MLflow pyfunc model, register it, and promote it through a gate.

    moa register --bundle outputs/bundle --name moa-recommender [--run-id RUN] [--experiment moa-recsys]

The model is logged from code (:mod:`moa.pipelines.recommender_model`, nothing pickled) with the bundle's files
as artifacts, a signature (``history``: list of item ids, ``domain``: str -> ``items``, ``scores``; param ``k``)
and an input example. Each registered version carries its validation NDCG@10 as the tag ``val_ndcg_10``; the
alias ``champion`` moves to the new version only when its NDCG@10 is strictly higher than the current
champion's. The decision and its reason are recorded as version tags (``promotion``, ``promotion_reason``).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

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


def register_and_gate(model_uri: str, name: str, metric: float, *, client: MlflowClient | None = None,
                      alias: str = CHAMPION) -> Promotion:
    """Register ``model_uri`` as a new version of ``name`` and move ``alias`` to it only if ``metric`` (validation
    NDCG@10) beats the current holder's; the decision is recorded as version tags."""
    client = client or MlflowClient()
    version = mlflow.register_model(model_uri, name).version
    client.set_model_version_tag(name, version, "val_ndcg_10", f"{metric:.6f}")
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is None:
        promoted, reason, holder = True, f"first version with a metric: val NDCG@10 {metric:.4f}", None
    else:
        holder = str(current.version)
        best = float(current.tags.get("val_ndcg_10", "-inf"))
        promoted = metric > best
        comparison = ">" if promoted else "<="
        reason = f"val NDCG@10 {metric:.4f} {comparison} {alias} v{holder}'s {best:.4f}"
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", "promoted" if promoted else "rejected")
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    return Promotion(name, str(version), promoted, reason, metric, holder)


def register_bundle(bundle: str | Path, name: str, *, run_id: str | None = None, experiment: str = "moa-recsys",
                    tracking_uri: str | None = None, metric: str = METRIC) -> Promotion:
    """Log, register and gate a bundle in one step (what ``moa register`` does)."""
    bundle = Path(bundle)
    metrics = json.loads((bundle / SERVICE_FILE).read_text()).get("metrics", {})
    if metric not in metrics:
        raise ValueError(f"the bundle's {SERVICE_FILE} has no metric {metric!r} to gate on; it has {sorted(metrics)}")
    info = log_recommender(bundle, run_id=run_id, experiment=experiment, tracking_uri=tracking_uri)
    return register_and_gate(info.model_uri, name, float(metrics[metric]))


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
