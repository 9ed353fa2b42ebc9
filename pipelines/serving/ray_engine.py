"""Scale-out on Ray: batch scoring with Ray Data and serving with Ray Serve replicas, for any registered moa model.

    moa batch --engine ray --model-uri models:/my-classifier@champion --input rows.parquet --out answers.parquet \\
        [--ray-address auto] [--workers 4]
    moa serve --engine ray --name my-classifier [--replicas 2] [--ray-address auto]

Without ``--ray-address`` a local Ray cluster is started for the command (and stopped with it); ``auto`` joins the
cluster this machine belongs to (``ray start --head`` here, ``ray start --address <head>:6379`` on the others), and
``ray://<head>:10001`` reaches a remote one through Ray Client. Every worker loads the model itself with
``mlflow.pyfunc.load_model``: on several machines, the tracking URI must name a store they all reach (a tracking
server, or a shared file system).

Batch: rows are split into blocks of about ``batch_size`` rows; an actor pool of ``workers`` scorers (one model copy
and one CPU each; a ``UserError`` at once when the cluster has no free CPU, where Ray would wait for one) runs
:func:`moa.pipelines.serving.scoring.score_rows` on ``batch_size`` rows at a time; order is preserved (an option of
this dataset only: Ray's process-wide ``DataContext`` is left as it was) and a refused row is named by its row
number in the whole input, as the local engine names it. Serving: the same defensive app as ``moa serve``
(:func:`moa.pipelines.serving.server.create_app`: limits, 400/413/415/503, no tracebacks) runs in each of
``replicas`` Ray Serve replicas behind Serve's HTTP proxy.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict
from typing import Any

import pandas as pd

from moa.experts.errors import UserError
from moa.pipelines.serving.scoring import conform, score_rows, unread_by
from moa.pipelines.serving.server import Limits, create_app, load, log_to_stderr
from moa.pipelines.tracking.store import resolve_tracking_uri


def init_ray(address: str | None, tracking_uri: str | None, *, log_to_driver: bool = False) -> None:
    """Connect to (or start) Ray with the tracking URI in every worker's environment; no dashboard; the workers'
    stderr (a Serve replica's ``moa.server`` lines) printed here only with ``log_to_driver``."""
    import ray

    if ray.is_initialized():
        return
    env = {"MLFLOW_TRACKING_URI": resolve_tracking_uri(tracking_uri), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    options: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": log_to_driver}
    if address is None:
        options.update(include_dashboard=False)
    ray.init(address=address, **options)


QUIET_SERVE = {"enable_access_log": False, "log_level": "WARNING"}  # Serve's own lines: its warnings only
ROW = "__moa_input_row__"
"""The hidden column that carries each row's number in the whole input through Ray Data (for error messages)."""
MAX_BLOCKS = 2000  # blocks of batch_size rows, fewer and larger past this many


def input_rows(message: str, rows) -> str:
    """A ``row i: ...`` message about row ``i`` of a Ray batch, with ``rows[i]``, its row number in the input."""
    def number(match: re.Match) -> str:
        i = int(match.group(1))
        return f"row {rows[i]}" if 0 <= i < len(rows) else match.group(0)

    return re.sub(r"^row (\d+)", number, message)


class _Scorer:
    """A Ray Data actor: one copy of the model, scoring pandas batches (the input columns kept)."""

    def __init__(self, model_uri: str, tracking_uri: str, params: dict[str, Any]):
        import mlflow
        import torch

        torch.set_num_threads(1)
        mlflow.set_tracking_uri(tracking_uri)
        self.model, self.params = mlflow.pyfunc.load_model(model_uri), params

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch[ROW].tolist()
        batch = batch.drop(columns=[ROW])
        try:
            return score_rows(self.model, conform(batch, self.model), self.params, batch_size=len(batch),
                              progress=False)
        except UserError as error:
            raise UserError(input_rows(str(error), rows)) from None


def _user_error(error: BaseException) -> UserError | None:
    """The scorer's own ``UserError`` inside the exceptions Ray wraps it in, if it is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error) is UserError:
            return error
        cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        error = cause if isinstance(cause, BaseException) else (error.__cause__ or error.__context__)
    return None


def _a_cpu_frees_up(ray, seconds: float = 10.0) -> bool:
    """Whether a CPU of the cluster is free within ``seconds``: the actors of a job that just ended release theirs a
    moment after it returns, so a busy cluster is polled briefly before it is called full."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < 1:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def score_rows_on_ray(model_uri: str, frame: pd.DataFrame, params: dict[str, Any] | None = None, *,
                      workers: int = 2, batch_size: int = 256, address: str | None = None,
                      tracking_uri: str | None = None) -> pd.DataFrame:
    """:func:`moa.pipelines.serving.scoring.score_rows` over a Ray cluster with Ray Data (``workers`` model copies); rows in
    input order, a refused row named by its input row number; ``attrs["ignored_columns"]`` names the columns the
    model does not read, as the local engine does."""
    import ray

    if workers < 1 or batch_size < 1:
        raise UserError(f"--workers and --batch-size must be >= 1, got {workers} and {batch_size}")
    if ROW in frame.columns:
        raise UserError(f"the input has a column named {ROW!r}, which moa's Ray engine uses itself; rename it")
    init_ray(address, tracking_uri)
    if not _a_cpu_frees_up(ray):  # Ray Data would wait for one (forever, on a fixed cluster)
        raise UserError(f"no CPU of the Ray cluster is free (all {ray.cluster_resources().get('CPU', 0):g} are held, "
                        "e.g. by the replicas of moa serve --engine ray); stop them or join a larger cluster")
    ignored = unread_by(_model_info(model_uri, tracking_uri), frame.columns)  # the scorers drop the same ones
    frame = frame.reset_index(drop=True).assign(**{ROW: range(len(frame))})
    size = max(batch_size, math.ceil(len(frame) / MAX_BLOCKS))  # many blocks, so that every actor gets work
    dataset = ray.data.from_pandas([frame.iloc[lo:lo + size] for lo in range(0, len(frame), size)] or [frame])
    options = dataset.context  # this dataset's own copy of the DataContext: the process-wide one is left alone
    options.execution_options.preserve_order = True
    options.raise_original_map_exception = True  # a refused row's UserError, not Ray's UserCodeException
    scored = dataset.map_batches(
        _Scorer, fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": resolve_tracking_uri(tracking_uri),
                                        "params": dict(params or {})},
        batch_size=batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    try:
        result = scored.to_pandas().reset_index(drop=True)
    except Exception as error:  # noqa: BLE001 - a refused row: the scorer's one-line message, without Ray's trace
        refused = _user_error(error)
        if refused is None:
            raise
        raise UserError(str(refused).splitlines()[0]) from None  # without the retry advice Ray appends
    for column in result.columns:  # Arrow-backed columns (lists) back to plain pandas, as the local engine writes
        if isinstance(result[column].dtype, pd.ArrowDtype):
            result[column] = pd.Series(result[column].tolist(), index=result.index)
    result.attrs["ignored_columns"] = ignored
    return result


def _model_info(model_uri: str, tracking_uri: str | None):
    """The registered model's signature and metadata (its MLmodel file only: no weights are loaded here)."""
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    return mlflow.models.get_model_info(model_uri)


def _app(model_uri: str, tracking_uri: str, limits: dict[str, Any], docs: bool, access_log: bool):
    """The replica's ASGI app (built on the replica, so the model loads there); its ``moa.server`` lines go to the
    replica's stderr, which Ray prints on the driver's (``log_to_driver``)."""
    log_to_stderr()
    return create_app(load(model_uri, tracking_uri), Limits(**limits), docs=docs, access_log=access_log)


def serve_on_ray(model_uri: str, *, replicas: int = 2, host: str = "127.0.0.1", port: int = 5055,
                 tracking_uri: str | None = None, limits=None, docs: bool = False, access_log: bool = False,
                 address: str | None = None, blocking: bool = True) -> None:
    """Serve ``model_uri`` with ``replicas`` Ray Serve replicas of moa's scoring app on ``host:port``; refused and
    failed requests (and answered ones with ``access_log``) are logged as by ``moa serve``, each line prefixed by
    Ray with the replica's name (Serve's own per-request lines are off)."""
    from ray import serve

    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    init_ray(address, tracking_uri, log_to_driver=True)
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET_SERVE)
    settings = (model_uri, resolve_tracking_uri(tracking_uri), asdict(limits or Limits()), docs, access_log)

    def builder():  # a plain zero-argument function: Serve calls it on each replica (a partial would pass for an app)
        return _app(*settings)

    deployment = serve.deployment(serve.ingress(builder)(), name="moa", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": 1}, logging_config=QUIET_SERVE)
    serve.run(deployment.bind(), name="moa", route_prefix="/", blocking=blocking)
