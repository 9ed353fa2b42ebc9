"""MLflow tracking for Lightning runs: the embedded-store logger, the config as an artifact, routing statistics.

* :class:`MLflowLogger` is Lightning's ``MLFlowLogger`` whose store is resolved when it is built:
  ``$MLFLOW_TRACKING_URI`` if set (a team's tracking server), else the embedded ``sqlite:///mlflow.db`` in the
  working directory (artifacts under ``./mlruns``). The stock logger falls back to the ``./mlruns`` file store,
  which MLflow 3.17 refuses.
* :class:`MLflowSaveConfig` fixes ``SaveConfigCallback`` for loggers without a local log directory (MLflow on a
  database or server store, Lightning issue #19441): the resolved config goes to the run as ``config.yaml``; with
  a logger that has a log directory, it is also written there as usual.
* :class:`RoutingStats` logs each epoch's expert usage (per expert, averaged over layers), the routing entropy
  and the share of the busiest expert as metrics, and a layers x experts heat map of the usage as an image.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from moa import MoAModel

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store runs go to: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class MLflowLogger(MLFlowLogger):
    """``MLFlowLogger`` on the embedded store by default (see :func:`resolve_tracking_uri`); same arguments otherwise."""

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


def mlflow_logger(trainer: Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


class MLflowSaveConfig(SaveConfigCallback):
    """Save the resolved LightningCLI config: to the MLflow run as ``config.yaml``, and to the log directory when
    the logger has one (the stock callback asserts a log directory, which MLflow on a database store lacks)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        wants_log_dir = self.save_to_log_dir
        self.save_to_log_dir = wants_log_dir and trainer.log_dir is not None  # log_dir is broadcast: same on all ranks
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            self.save_to_log_dir = wants_log_dir

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / self.config_filename
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
            logger.experiment.log_artifact(logger.run_id, str(path))


def usage_entropy(usage: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of a usage matrix whose rows sum to one."""
    p = usage.clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def find_moa_model(module: torch.nn.Module) -> MoAModel | None:
    return next((m for m in module.modules() if isinstance(m, MoAModel)), None)


class RoutingStats(Callback):
    """Expert usage and routing entropy of the training batches, per epoch, as metrics and a heat map.

    Metrics: ``routing/usage/expert_<e>`` (share of routing slots, mean over layers), ``routing/entropy`` (mean
    over layers of the entropy of the layer's usage, nats; ``log E`` is perfectly balanced),
    ``routing/max_usage`` (share of the busiest expert, mean over layers). The heat map
    ``routing/usage_epoch<NNN>.png`` goes to the MLflow run (or the log directory of other loggers).

    Args:
        every_n_steps: read the routing statistics every this many training steps.
        heatmap: log the heat map image.
    """

    def __init__(self, every_n_steps: int = 1, heatmap: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.heatmap = every_n_steps, heatmap
        self._sums: dict[str, torch.Tensor] = {}
        self._counts = 0
        self.last_usage: torch.Tensor | None = None  # [layers, experts] of the last epoch
        self.last_layers: list[str] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sums, self._counts = {}, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if batch_idx % self.every_n_steps:
            return
        model = find_moa_model(pl_module)
        stats = model.routing_stats() if model is not None else {}
        for name, usage in stats.items():
            usage = usage.detach().float().cpu()
            self._sums[name] = self._sums[name] + usage if name in self._sums else usage.clone()
        if stats:
            self._counts += 1

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._counts:
            return
        self.last_layers = sorted(self._sums)
        usage = torch.stack([self._sums[name] / self._counts for name in self.last_layers])
        self.last_usage = usage
        mean = usage.mean(0)
        metrics = {f"routing/usage/expert_{e}": float(v) for e, v in enumerate(mean)}
        metrics["routing/entropy"] = float(usage_entropy(usage).mean())
        metrics["routing/max_usage"] = float(usage.max(-1).values.mean())
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)
        if self.heatmap and trainer.is_global_zero:
            self._log_heatmap(trainer, usage, trainer.current_epoch)

    def _log_heatmap(self, trainer: Trainer, usage: torch.Tensor, epoch: int) -> None:
        png = heatmap_png(usage, self.last_layers, title=f"expert usage, epoch {epoch}")
        name = f"routing/usage_epoch{epoch:03d}.png"
        logger = mlflow_logger(trainer)
        if logger is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(name).name
                path.write_bytes(png)
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="routing")
        elif trainer.log_dir is not None:
            path = Path(trainer.log_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)


def heatmap_png(usage: torch.Tensor, layers: list[str], title: str) -> bytes:
    """A layers x experts heat map of routing usage, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_layers, n_experts = usage.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n_experts, 1.0 + 0.28 * n_layers), dpi=100)
    image = ax.imshow(usage.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels(_short_names(layers), fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of routing slots")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _short_names(names: list[str]) -> list[str]:
    """Layer names without the module path they all share (``encoder.layer.``)."""
    split = [name.split(".") for name in names]
    common = 0
    while split and all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
        common += 1
    return [".".join(p[common:]) for p in split]
