"""Scale-out on Ray: batch scoring with Ray Data and serving with Ray Serve replicas, for any registered moa model.

    moa batch --engine ray --model-uri models:/my-classifier@champion --input rows.parquet --out answers.parquet \\
        [--ray-address auto] [--workers 4]
    moa serve --engine ray --name my-classifier [--replicas 2] [--ray-address auto]

Without ``--ray-address`` a local Ray cluster is started for the command (and stopped with it); ``auto`` joins the
cluster this machine belongs to (``ray start --head`` here, ``ray start --address <head>:6379`` on the others), and
``ray://<head>:10001`` reaches a remote one through Ray Client. Every worker loads the model itself with
``mlflow.pyfunc.load_model``: on several machines, the tracking URI must name a store they all reach (a tracking
server, or a shared file system).

Batch: rows are split into blocks; an actor pool of ``workers`` scorers (one model copy each) runs
:func:`moa.pipelines.serving.score_rows` on ``batch_size`` rows at a time; order is preserved. Serving: the same
defensive app as ``moa serve`` (:func:`moa.pipelines.server.create_app`: limits, 400/413/415/503, no tracebacks)
runs in each of ``replicas`` Ray Serve replicas behind Serve's HTTP proxy.
"""

from __future__ import annotations

from moa.experts.errors import UserError
import os
from dataclasses import asdict
from typing import Any

import pandas as pd

from .tracking import resolve_tracking_uri


def init_ray(address: str | None, tracking_uri: str | None) -> None:
    """Connect to (or start) Ray with the tracking URI in every worker's environment; quiet, no dashboard."""
    import ray

    if ray.is_initialized():
        return
    env = {"MLFLOW_TRACKING_URI": resolve_tracking_uri(tracking_uri), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    options: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
    if address is None:
        options.update(include_dashboard=False)
    ray.init(address=address, **options)


class _Scorer:
    """A Ray Data actor: one copy of the model, scoring pandas batches (the input columns kept)."""

    def __init__(self, model_uri: str, tracking_uri: str, params: dict[str, Any]):
        import mlflow
        import torch

        torch.set_num_threads(1)
        mlflow.set_tracking_uri(tracking_uri)
        self.model, self.params = mlflow.pyfunc.load_model(model_uri), params

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from .serving import conform, score_rows

        return score_rows(self.model, conform(batch, self.model), self.params, batch_size=len(batch), progress=False)


def score_rows_on_ray(model_uri: str, frame: pd.DataFrame, params: dict[str, Any] | None = None, *,
                      workers: int = 2, batch_size: int = 256, address: str | None = None,
                      tracking_uri: str | None = None) -> pd.DataFrame:
    """:func:`moa.pipelines.serving.score_rows` over a Ray cluster with Ray Data (``workers`` model copies)."""
    import ray

    if workers < 1 or batch_size < 1:
        raise UserError(f"--workers and --batch-size must be >= 1, got {workers} and {batch_size}")
    init_ray(address, tracking_uri)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    dataset = ray.data.from_pandas(frame.reset_index(drop=True))
    scored = dataset.map_batches(
        _Scorer, fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": resolve_tracking_uri(tracking_uri),
                                        "params": dict(params or {})},
        batch_size=batch_size, batch_format="pandas", concurrency=workers, num_cpus=1)
    result = scored.to_pandas().reset_index(drop=True)
    for column in result.columns:  # Arrow-backed columns (lists) back to plain pandas, as the local engine writes
        if isinstance(result[column].dtype, pd.ArrowDtype):
            result[column] = pd.Series(result[column].tolist(), index=result.index)
    return result


def _app(model_uri: str, tracking_uri: str, limits: dict[str, Any], docs: bool):
    """The replica's ASGI app (built on the replica, so the model loads there)."""
    from .server import Limits, create_app, load

    return create_app(load(model_uri, tracking_uri), Limits(**limits), docs=docs)


def serve_on_ray(model_uri: str, *, replicas: int = 2, host: str = "127.0.0.1", port: int = 5055,
                 tracking_uri: str | None = None, limits=None, docs: bool = False, address: str | None = None,
                 blocking: bool = True) -> None:
    """Serve ``model_uri`` with ``replicas`` Ray Serve replicas of moa's scoring app on ``host:port``."""
    from ray import serve

    from .server import Limits

    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    init_ray(address, tracking_uri)
    serve.start(http_options={"host": host, "port": port})
    settings = (model_uri, resolve_tracking_uri(tracking_uri), asdict(limits or Limits()), docs)

    def builder():  # a plain zero-argument function: Serve calls it on each replica (a partial would pass for an app)
        return _app(*settings)

    deployment = serve.deployment(serve.ingress(builder)(), name="moa", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": 1})
    serve.run(deployment.bind(), name="moa", route_prefix="/", blocking=blocking)
