"""Routing statistics of a fit: :class:`RoutingStats` logs each epoch's expert usage (per expert, averaged over
layers), the routing entropy and the share of the busiest expert as metrics, and a layers x experts heat map of
the usage as an image; at the end of a fit of a Poly / MHR model, the task-skill matrix as an image."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from moa.experts.errors import UserError
from moa.pipelines.tracking.logger import find_moa_model, mlflow_logger


def usage_entropy(usage: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of a usage matrix whose rows sum to one."""
    p = usage.clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


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
            raise UserError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.heatmap = every_n_steps, heatmap
        self._sums: dict[str, torch.Tensor] = {}
        self._counts = 0
        self.last_usage: torch.Tensor | None = None  # [layers, experts] of the last epoch
        self.last_layers: list[str] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sums, self._counts = {}, 0

    def state_dict(self) -> dict[str, Any]:  # the epoch so far, for a fit resumed mid-epoch
        return {"sums": self._sums, "counts": self._counts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sums, self._counts = dict(state_dict["sums"]), state_dict["counts"]

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

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Poly / MHR: the learned task-skill weights of every layer, ``routing/task_skill_matrix.png``."""
        from moa.transfer import plot_task_skill_matrix, task_routers

        model = find_moa_model(pl_module)
        if not (self.heatmap and trainer.is_global_zero and model is not None):
            return
        try:
            task_routers(model)
        except ValueError:  # not task-routed
            return
        tasks = (getattr(pl_module, "names", None) or {}).get("tasks")
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_task_skill_matrix(model, Path(tmp) / "task_skill_matrix.png", task_names=tasks)
            _save_artifact(trainer, "routing/task_skill_matrix.png", path.read_bytes())

    def _log_heatmap(self, trainer: Trainer, usage: torch.Tensor, epoch: int) -> None:
        png = heatmap_png(usage, self.last_layers, title=f"expert usage, epoch {epoch}")
        _save_artifact(trainer, f"routing/usage_epoch{epoch:03d}.png", png)


def _save_artifact(trainer: Trainer, name: str, data: bytes) -> None:
    """``name`` (``folder/file``) to the MLflow run, else to the log directory of other loggers."""
    logger = mlflow_logger(trainer)
    if logger is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_bytes(data)
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=str(Path(name).parent))
    elif trainer.log_dir is not None:
        path = Path(trainer.log_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


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

