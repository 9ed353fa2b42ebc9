"""The resolved LightningCLI config of a run, to MLflow: :class:`MLflowSaveConfig`.

It fixes ``SaveConfigCallback`` for loggers without a local log directory (MLflow on a database or server store,
Lightning issue #19441): the resolved config goes to the run as ``config.yaml``; with a logger that has a log
directory, it is also written there as usual. It also logs the config as params prefixed by section
(``model.<name>``, ``data.<name>``, ``trainer.<name>``: :func:`config_params`; Lightning's own unprefixed hparams
logging is off in the CLI), the ``moa.*`` tags (:func:`run_tags`) and the parameter counts. :func:`run_name` is
the default run name of a MoA model.
"""

from __future__ import annotations

import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

import moa
from moa import MoAModel
from moa.pipelines.tracking.logger import find_moa_model, mlflow_logger


def run_name(model: MoAModel, seed: int | None = None) -> str:
    """A short name of the adapters and the seed, e.g. ``topk-E4-k2-s0``, ``static-E4-key=task_ids-s0``,
    ``poly-E4-hyper`` (no seed)."""
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
    if seed_value(seed) is not None:
        parts.append(f"s{seed}")
    return "-".join(parts)


def seed_value(seed: Any) -> int | None:
    """The run's seed (``seed_everything``; ``True`` was replaced by the drawn one), or None when not seeded."""
    return seed if type(seed) is int else None


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
    """``moa.*`` tags: version, model and data class paths, and router / expert kind / backbone of a MoA model;
    ``seed``: the run's seed (``seed_everything``) when it has one."""
    config = _as_dict(config)
    tags = {"moa.version": moa.__version__}
    if seed_value(config.get("seed_everything")) is not None:
        tags["seed"] = str(config["seed_everything"])
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

