"""The MLflow logger of Lightning runs, and the lookups every tracking callback makes.

* :class:`MLflowLogger` is Lightning's ``MLFlowLogger`` whose store is resolved when it is built
  (:func:`moa.pipelines.tracking.store.resolve_tracking_uri`): ``$MLFLOW_TRACKING_URI`` if set (a team's tracking
  server), else the embedded ``sqlite:///mlflow.db`` in the working directory (artifacts under ``./mlruns``). The
  stock logger falls back to the ``./mlruns`` file store, which MLflow 3.17 refuses. Params are flattened
  (:func:`flatten_params`) and cut to MLflow's length limit.
* :func:`mlflow_logger` (the trainer's MLflow logger) and :func:`find_moa_model` (the MoA model inside a module).
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import MutableMapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from moa import MoAModel
from moa.pipelines.tracking.store import resolve_tracking_uri

MAX_PARAM_LENGTH = 500  # MLflow's limit on param values since 1.28 (3.x stores take 6000; a team server may be older)


class MLflowLogger(MLFlowLogger):
    """``MLFlowLogger`` on the embedded store by default (see :func:`resolve_tracking_uri`); same arguments otherwise.

    Choosing the run before it starts (:meth:`name_by_default`, :meth:`continue_run`, :meth:`stage_run`) sets
    ``MLFlowLogger``'s private ``_run_name`` / ``_run_id`` / ``_initialized`` (no public way: lightning is pinned
    below the next minor and ``tests/test_private_apis.py`` checks them).
    """

    def __init__(
        self,
        experiment_name: str = "moa",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: Literal[True, False, "all"] = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
    ):
        super().__init__(
            experiment_name=experiment_name, run_name=run_name, tracking_uri=resolve_tracking_uri(tracking_uri), tags=tags,
            log_model=log_model, prefix=prefix, artifact_location=artifact_location, run_id=run_id,
            synchronous=synchronous,
        )
        self.store_uri = resolve_tracking_uri(tracking_uri)
        self.batch_kwargs = {} if synchronous is None else {"synchronous": synchronous}

    def name_by_default(self, name: str | None) -> None:
        """Name the run ``name`` unless it was given a name (or a run) already; only before the run exists."""
        if self._run_name is None and self._run_id is None and not self._initialized:
            self._run_name = name

    def continue_run(self, run_id: str) -> bool:
        """Log to the existing run ``run_id`` (e.g. the run of the checkpoint a fit resumes from) if this logger's
        store has it and no run was chosen or started yet; whether it will."""
        if self._run_id is not None or self._initialized or self.stored_run(run_id) is None:
            return False
        self._run_id = run_id
        return True

    def stage_run(self, stage: str, parent_id: str | None, default_name: str | None,
                  ckpt_path: str | None = None) -> None:
        """Set up a run of its own for ``validate`` / ``test``: ``<name>-<stage>``, nested under the run
        ``parent_id`` (the checkpoint's) when the store has it; ``<name>``: the logger's, the parent's or
        ``default_name``. The checkpoint evaluated is its tag ``ckpt_path`` (a local file as an absolute path)."""
        if self._run_id is not None or self._initialized:
            return
        parent = self.stored_run(parent_id) if parent_id is not None else None
        if ckpt_path is not None:
            local = Path(ckpt_path)
            self.tags = {**(self.tags or {}), "ckpt_path": str(local.resolve()) if local.is_file() else str(ckpt_path)}
        if parent is not None:
            self.tags = {**(self.tags or {}), "mlflow.parentRunId": parent_id}
        name = self._run_name or (parent.info.run_name if parent is not None else default_name) or "moa"
        self._run_name = f"{name}-{stage}"

    def stored_run(self, run_id: str):
        """The run ``run_id`` of this logger's store, or None (without starting this logger's run)."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            return MlflowClient(self.store_uri).get_run(run_id)
        except MlflowException:
            return None

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        """Log params (nested dicts flattened with ``/``), values cut to MLflow's limit. MLflow params are
        immutable, so in a continued run (a resumed fit) only new params are logged; changed values are warned."""
        from mlflow.entities import Param

        params = vars(params) if isinstance(params, Namespace) else params or {}
        params = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten_params(params).items()}
        existing = self.experiment.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            rank_zero_warn(f"MLflow run {self.run_id} keeps its params {changed}; this fit's values differ: "
                           + ", ".join(f"{k}={params[k]!r}" for k in changed))
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow takes 100 params per batch
            self.experiment.log_batch(run_id=self.run_id, params=new[i : i + 100], **self.batch_kwargs)


def flatten_params(params: Mapping[Any, Any], parent: str = "") -> dict[str, Any]:
    """Nested dicts (and namespaces, dataclasses, lists of dicts) as one level, keys joined with ``/``:
    ``{"a": {"b": 1}, "l": [{"c": 2}]}`` -> ``{"a/b": 1, "l/0/c": 2}`` (Lightning's own flattening)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}/{key}" if parent else str(key)
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        elif isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, MutableMapping):
            out.update(flatten_params(value, name))
        elif isinstance(value, list) and all(isinstance(item, MutableMapping) for item in value):
            for i, item in enumerate(value):
                out.update(flatten_params(item, f"{name}/{i}"))
        else:
            out[name] = value
    return out


def mlflow_logger(trainer: Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def find_moa_model(module: torch.nn.Module) -> MoAModel | None:
    return next((m for m in module.modules() if isinstance(m, MoAModel)), None)

