"""MLflow tracking for Lightning runs: the embedded-store logger, the config as an artifact, routing statistics.

* :class:`MLflowLogger` is Lightning's ``MLFlowLogger`` whose store is resolved when it is built:
  ``$MLFLOW_TRACKING_URI`` if set (a team's tracking server), else the embedded ``sqlite:///mlflow.db`` in the
  working directory (artifacts under ``./mlruns``). The stock logger falls back to the ``./mlruns`` file store,
  which MLflow 3.17 refuses.
* :class:`MLflowSaveConfig` fixes ``SaveConfigCallback`` for loggers without a local log directory (MLflow on a
  database or server store, Lightning issue #19441): the resolved config goes to the run as ``config.yaml``; with
  a logger that has a log directory, it is also written there as usual.
  It also logs the config as params prefixed by section (``model.<name>``, ``data.<name>``, ``trainer.<name>``;
  Lightning's own unprefixed hparams logging is off in the CLI), the ``moa.*`` tags and the parameter counts.
* :class:`RoutingStats` logs each epoch's expert usage (per expert, averaged over layers), the routing entropy
  and the share of the busiest expert as metrics, and a layers x experts heat map of the usage as an image; at the
  end of a fit of a Poly / MHR model, the task-skill matrix as an image.
* :class:`ResumeState` puts the RNG states, the position in the epoch and the MLflow run id in every checkpoint,
  so that a fit resumed from one (even mid-epoch) continues exactly, in the same MLflow run.
* :class:`LogBundle` writes the trained model's serving bundle at the end of fit, logs it to the run as an
  MLflow model and optionally registers and gates it.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import tempfile
import warnings
from argparse import Namespace
from collections.abc import MutableMapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from moa.experts.errors import UserError, UserTypeError
import moa
from moa import MoAModel

MAX_PARAM_LENGTH = 500  # MLflow's limit on param values since 1.28 (3.x stores take 6000; a team server may be older)
RESUME_KEY = "moa_resume"  # the checkpoint entry of ResumeState
METRICS_KEY = "moa_metrics"  # the checkpoint entry of LogBundle: the validation figures of the weights saved


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store runs go to: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store of the
    working directory, by absolute path (MLflow caches stores by URI: a relative one would keep the first
    directory's database in a process that changes directory)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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

    def stage_run(self, stage: str, parent_id: str | None, default_name: str | None) -> None:
        """Set up a run of its own for ``validate`` / ``test``: ``<name>-<stage>``, nested under the run
        ``parent_id`` (the checkpoint's) when the store has it; ``<name>``: the logger's, the parent's or
        ``default_name``."""
        if self._run_id is not None or self._initialized:
            return
        parent = self.stored_run(parent_id) if parent_id is not None else None
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


def run_name(model: MoAModel) -> str:
    """A short name of the adapters, e.g. ``topk-E4-k2``, ``static-E4-key=task_ids``, ``poly-E4-hyper``."""
    from moa.routers import ROUTERS

    config = model.config
    parts = [config.router, f"E{config.n_experts}"]
    router = ROUTERS.get(config.router)
    if router is None or router.uses_top_k:
        parts.append(f"k{config.top_k}")
    if config.expert_kind != "lora":
        parts.append(config.expert_kind)
    if "key" in config.router_options:
        parts.append(f"key={config.router_options['key']}")
    return "-".join(parts)


def config_params(config: Namespace | dict) -> dict[str, Any]:
    """A LightningCLI config as flat params prefixed by section: ``model.<arg>``, ``data.<arg>``, ``trainer.<arg>``
    (``init_args`` collapsed, nested dicts joined with ``.``, class-path objects and lists of them by class name)
    and ``seed_everything``."""
    config = _as_dict(config)
    out: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and "class_path" in value:
            out[prefix] = value["class_path"]
            for key, inner in (value.get("init_args") or {}).items():
                visit(f"{prefix}.{key}", inner)
        elif isinstance(value, dict) and value:
            for key, inner in value.items():
                visit(f"{prefix}.{key}", inner)
        elif isinstance(value, list) and any(isinstance(v, dict) and "class_path" in v for v in value):
            out[prefix] = ", ".join(v["class_path"].rsplit(".", 1)[-1] if isinstance(v, dict) else str(v) for v in value)
        else:
            out[prefix] = value

    for section in ("model", "data", "trainer"):
        if config.get(section) is not None:
            value = config[section]
            visit(section, value.get("init_args", {}) if isinstance(value, dict) and "class_path" in value else value)
    out.pop("trainer.logger", None)  # the run itself
    out = {k: v for k, v in out.items() if not k.startswith("trainer.logger.")}
    if "seed_everything" in config:
        out["seed_everything"] = config["seed_everything"]
    return out


def _as_dict(value: Any) -> Any:
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {k: _as_dict(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, (list, tuple)):
        return [_as_dict(v) for v in value]
    return value


def run_tags(pl_module: LightningModule, config: dict[str, Any]) -> dict[str, str]:
    """``moa.*`` tags: version, model and data class paths, and router / expert kind / backbone of a MoA model."""
    config = _as_dict(config)
    tags = {"moa.version": moa.__version__}
    for section in ("model", "data"):
        value = config.get(section)
        if isinstance(value, dict) and "class_path" in value:
            tags[f"moa.{section}_class"] = value["class_path"]
    model = find_moa_model(pl_module)
    if model is not None:
        tags["moa.router"], tags["moa.expert_kind"] = model.config.router, model.config.expert_kind
        base = getattr(model.model, "config", None)  # the transformers config of the wrapped model
        backbone = pl_module.hparams.get("backbone") or getattr(base, "name_or_path", "") or getattr(base, "model_type", "")
        tags["moa.backbone"] = str(backbone)
    return tags


class MLflowSaveConfig(SaveConfigCallback):
    """Save the resolved LightningCLI config: to the MLflow run as ``config.yaml``, and to the log directory when
    the logger has one (the stock callback asserts a log directory, which MLflow on a database store lacks).

    It also logs the config to every logger as params prefixed by section (:func:`config_params`), and to the
    MLflow run the ``moa.*`` tags (:func:`run_tags`) and the params ``moa.trainable_params`` / ``moa.total_params``
    (of the MoA model, as printed at fit start). Nothing for ``predict``, which makes no run.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict":
            return
        wants_log_dir = self.save_to_log_dir
        self.save_to_log_dir = wants_log_dir and trainer.log_dir is not None  # log_dir is broadcast: same on all ranks
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            self.save_to_log_dir = wants_log_dir

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        params = config_params(self.config)
        model = find_moa_model(pl_module)
        if model is not None:
            params["moa.trainable_params"], params["moa.total_params"] = model.count_parameters()
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        for key, value in run_tags(pl_module, self.config).items():
            logger.experiment.set_tag(logger.run_id, key, value)
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


class ResumeState(Callback):
    """Exact resume, mid-epoch included, in the same MLflow run (always on in ``moa fit``).

    Lightning checkpoints the weights, optimizers and loop counters but not the random state, and it restarts an
    interrupted epoch's loader from its first batch unless the loader is stateful. This callback adds to every
    checkpoint (entry ``moa_resume``) the torch (CPU and CUDA), numpy and Python RNG states, the RNG states the
    epoch's train loader iterator was made from (its shuffle order and worker seeds come from them), the batches
    done in the epoch, and the MLflow run id. Resuming, it remakes the epoch's iterator from those states, skips
    the batches done (loading them: no sampler internals) and sets the checkpoint's RNG states, so the run goes
    on as if it had not stopped; the CLI logs to the checkpoint's MLflow run when the store has it.

    Assumes no hook draws random numbers between the start of an epoch and its first batch. Under DDP only rank
    0's RNG states are saved (every rank resumes from them).
    """

    def __init__(self):
        self._epoch_rng: dict[str, Any] | None = None  # RNG states the current epoch's train iterator came from
        self._iterator_made = False  # the current epoch's iterator exists (made before on_train_epoch_start)
        self._batches = 0
        self._restore: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning makes the first epoch's iterator after this hook (the sanity check keeps the RNG state)
        self._epoch_rng, self._iterator_made = rng_states(), True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state, self._restore = self._restore, None
        fetcher = trainer.fit_loop._data_fetcher
        if state is None or fetcher is None:
            return
        mid_epoch = state["epoch"] == trainer.current_epoch and 0 < state["batches"] < trainer.num_training_batches
        if mid_epoch:  # the epoch's iterator again, then past the batches done
            set_rng_states(state["epoch_rng"])
            iter(fetcher)
            fetched = fetcher.fetched
            for _ in range(state["batches"]):
                next(fetcher)
            fetcher.fetched = fetched  # Lightning adds the batches done itself
            self._epoch_rng, self._batches = state["epoch_rng"], state["batches"]
            set_rng_states(state["rng"])
        else:  # at an epoch's end: the next epoch's iterator, as the run made it after the checkpoint
            set_rng_states(state["rng"])
            self._epoch_rng = rng_states()
            iter(fetcher)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._iterator_made:  # Lightning makes this epoch's iterator after this hook
            self._epoch_rng = rng_states()
        self._iterator_made, self._batches = False, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._batches += 1  # before ModelCheckpoint's hook: Lightning runs checkpoint callbacks last

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._iterator_made = False

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        logger = mlflow_logger(trainer)
        checkpoint[RESUME_KEY] = {
            "rng": rng_states(), "epoch_rng": self._epoch_rng, "epoch": trainer.current_epoch,
            "batches": self._batches, "mlflow_run_id": logger.run_id if logger is not None else None,
        }

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restore = checkpoint.get(RESUME_KEY) if trainer.training else None
        if self._restore is not None:  # this callback makes the epoch resumable
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")


def rng_states() -> dict[str, Any]:
    """The torch (CPU, CUDA), numpy and Python RNG states (the keys Lightning uses), in types
    ``torch.load(weights_only=True)`` reads: numpy's key array as a tensor."""
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype("int64")), *rest),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the RNG states :func:`rng_states` returned (CUDA's only where it was recorded)."""
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda"):
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    if "numpy" in states:
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), *rest))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


def load_checkpoint(path: str | os.PathLike, **kwargs) -> dict[str, Any]:
    """A checkpoint file read as data only (``torch.load(weights_only=True)``: tensors, numbers, strings and
    containers, never a pickled object, whose loading could run code); a :class:`UserError` naming the problem
    for a file that holds other objects or is no checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise UserError(f"the checkpoint {path} holds a pickled object ({found.group(1)}), which moa does not "
                            "load: loading it could run code") from None
        first = " ".join(str(error).split())[:200]
        raise UserError(f"{path} is not a readable checkpoint: {first}") from None


def checkpoint_run_id(ckpt_path: str | os.PathLike | None) -> str | None:
    """The MLflow run id :class:`ResumeState` recorded in a checkpoint file (None without one); read as data only
    (:func:`load_checkpoint`: a checkpoint with a pickled object is refused before Lightning loads it)."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return None
    checkpoint = load_checkpoint(ckpt_path, mmap=True)
    resume = checkpoint.get(RESUME_KEY) if isinstance(checkpoint, dict) else None
    return resume.get("mlflow_run_id") if isinstance(resume, dict) else None


class LogBundle(Callback):
    """At the end of fit: write the model's serving bundle and, with the MLflow logger, log it to the fit's run as
    an MLflow pyfunc model and optionally register and gate it (``moa register`` inside ``moa fit``).

    The module says what its bundle is (``write_bundle(directory, datamodule, metrics=..., base=...)``; every model
    module of moa has it). ``ship="last"`` ships the last weights with the fit's last validation values
    (``trainer.callback_metrics``); ``ship="best"`` first restores the best checkpoint of the trainer's monitoring
    ``ModelCheckpoint`` (best-epoch selection is Lightning's) and ships it with the validation values recorded in
    that checkpoint. Either way the gate sees the figures of the weights it ships.

    Args:
        directory: where the bundle is written (replaced as a whole).
        register_as: registered model name; ``None``: log to the run only.
        metric, mode: the gate (``None``: the kind's default, e.g. ``val/accuracy`` max for classifiers,
            ``val/loss`` min for causal LMs, ``val/ndcg_10`` max for recommenders).
        base: ``"include"`` the base weights, or ``"reference"`` the backbone by name (see
            :func:`moa.pipelines.kinds.text_bundle.write_text_bundle`).
        ship: ``"last"`` or ``"best"`` (the monitoring ``ModelCheckpoint``'s best epoch).
    """

    def __init__(self, directory: str = "bundle", register_as: str | None = None, metric: str | None = None,
                 mode: Literal["max", "min"] | None = None, base: Literal["include", "reference"] = "include",
                 ship: Literal["last", "best"] = "last"):
        if mode not in (None, "max", "min"):
            raise UserError(f"mode must be 'max' or 'min', got {mode!r}")
        if ship not in ("last", "best"):
            raise UserError(f"ship must be 'last' or 'best', got {ship!r}")
        self.directory, self.register_as, self.metric, self.mode, self.base = directory, register_as, metric, mode, base
        self.ship = ship
        self.bundle: Path | None = None
        self.model_uri: str | None = None
        self.promotion = None
        self.metrics: dict[str, float] = {}
        self.epoch: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module, "write_bundle", None) is None:
            raise UserTypeError(f"LogBundle: {type(pl_module).__name__} cannot write a serving bundle (no write_bundle)")
        if self.register_as and mlflow_logger(trainer) is None:
            raise UserError(f"LogBundle(register_as={self.register_as!r}) needs the MLflow logger "
                             "(moa.pipelines.tracking.callbacks.MLflowLogger); trainer.logger is off")
        if self.ship == "best" and self._monitor(trainer) is None:
            raise UserError("LogBundle(ship='best') needs a ModelCheckpoint with a monitor (the best epoch's keeper)")

    @staticmethod
    def _monitor(trainer: Trainer) -> ModelCheckpoint | None:
        return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[METRICS_KEY] = _scalars(trainer.callback_metrics)  # the figures of the weights saved

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.interrupted:
            return
        from moa.pipelines.bundle import bundle_meta, default_gate
        from moa.pipelines.tracking.registry import check_metric, log_bundle, register_and_gate

        self.metrics, self.epoch = _scalars(trainer.callback_metrics), trainer.current_epoch - 1  # the last one
        if self.ship == "best":
            self._restore_best(trainer, pl_module)
        self.bundle = pl_module.write_bundle(self.directory, getattr(trainer, "datamodule", None),
                                             metrics=self.metrics, base=self.base)
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        metric, mode = default_gate(bundle_meta(self.bundle)["kind"])
        metric, mode = self.metric or metric, self.mode or mode
        value = check_metric(self.metrics.get(metric), f"the fit's {metric}") if self.register_as else None
        if self.ship == "best":
            logger.log_metrics({"best/epoch": float(self.epoch),
                                **{f"best/{k}": v for k, v in self.metrics.items() if k.startswith("val/")}})
        info = log_bundle(self.bundle, run_id=logger.run_id, tracking_uri=logger.experiment.tracking_uri)
        self.model_uri = info.model_uri
        if self.register_as:
            self.promotion = register_and_gate(info.model_uri, self.register_as, value, metric_name=metric, mode=mode)

    def _restore_best(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self._monitor(trainer).best_model_path
        if not path:
            raise RuntimeError("LogBundle(ship='best'): the ModelCheckpoint saved no best checkpoint (no validation?)")
        checkpoint = load_checkpoint(path)
        _, unexpected = pl_module.load_state_dict(checkpoint["state_dict"], strict=False)  # trainable part only
        if unexpected:
            raise RuntimeError(f"the best checkpoint {path} does not fit the module: unexpected {unexpected[:3]}")
        pl_module.on_load_checkpoint(checkpoint)
        self.metrics, self.epoch = dict(checkpoint.get(METRICS_KEY, self.metrics)), int(checkpoint["epoch"])


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.numel() == 1}
