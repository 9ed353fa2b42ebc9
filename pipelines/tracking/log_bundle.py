"""The bundle of a fit: :class:`LogBundle` writes the trained model's serving bundle at the end of fit, logs it to
the run as an MLflow model and optionally registers and gates it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from moa.experts.errors import UserError, UserTypeError
from moa.pipelines.tracking.logger import mlflow_logger
from moa.pipelines.tracking.resume import load_checkpoint

METRICS_KEY = "moa_metrics"  # the checkpoint entry of LogBundle: the validation figures of the weights saved


class LogBundle(Callback):
    """At the end of fit: write the model's serving bundle and, with the MLflow logger, log it to the fit's run as
    an MLflow pyfunc model and optionally register and gate it (``moa register`` inside ``moa fit``). Nothing
    under ``fast_dev_run`` (one line says so).

    The module says what its bundle is (``write_bundle(directory, datamodule, metrics=..., base=...)``; every model
    module of moa has it). ``ship="last"`` ships the last weights with the fit's last validation values
    (``trainer.callback_metrics``); ``ship="best"`` first restores the best checkpoint of the trainer's monitoring
    ``ModelCheckpoint`` (best-epoch selection is Lightning's) and ships it with the validation values recorded in
    that checkpoint. Either way the gate sees the figures of the weights it ships.
    With the MLflow logger the fit's run id is recorded in the bundle (``mlflow_run.json``, see
    :func:`moa.pipelines.tracking.registry.record_run`) before it is logged: ``moa register`` of the bundle logs
    into that run.

    Args:
        directory: where the bundle is written (replaced as a whole).
        register_as: registered model name; ``None``: log to the run only.
        metric, mode: the gate (``None``: the kind's default, e.g. ``val/accuracy`` max for classifiers,
            ``val/loss`` min for causal LMs, ``val/ndcg_10`` max for recommenders).
        base: ``"reference"`` the backbone by name or path (no copy of its weights; a random preset is included
            all the same), or ``"include"`` its weights (see :func:`moa.pipelines.kinds.text_bundle.write_text_bundle`).
        ship: ``"last"`` or ``"best"`` (the monitoring ``ModelCheckpoint``'s best epoch); ``"best"`` logs its
            ``best/epoch``, ``best/step`` (the one that counts with ``val_check_interval`` in steps) and ``best/val/*``.
    """

    def __init__(self, directory: str = "bundle", register_as: str | None = None, metric: str | None = None,
                 mode: Literal["max", "min"] | None = None, base: Literal["reference", "include"] = "reference",
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
        self.step: int | None = None  # the global step of the weights shipped (validation every N steps: the one)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module, "write_bundle", None) is None:
            raise UserTypeError(f"LogBundle: {type(pl_module).__name__} cannot write a serving bundle (no write_bundle)")
        if getattr(pl_module, "bundle_kind", None) is not None:  # a kind nothing serves: said before training
            from moa.pipelines.bundle import get_kind

            get_kind(pl_module.bundle_kind)
        if self.register_as and mlflow_logger(trainer) is None:
            raise UserError(f"LogBundle(register_as={self.register_as!r}) needs the MLflow logger "
                             "(moa.pipelines.tracking.logger.MLflowLogger); trainer.logger is off")
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
        if trainer.fast_dev_run:  # a smoke run: its weights are no model to ship, nor to overwrite a bundle with
            rank_zero_info(f"LogBundle: fast_dev_run, so no bundle is written ({self.directory} is left as it was)")
            return
        from moa.pipelines.bundle import bundle_meta, default_gate
        from moa.pipelines.tracking.registry import check_metric, log_bundle, record_run, register_and_gate

        self.metrics, self.epoch = _scalars(trainer.callback_metrics), trainer.current_epoch - 1  # the last one
        self.step = trainer.global_step
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
            logger.log_metrics({"best/epoch": float(self.epoch), "best/step": float(self.step),
                                **{f"best/{k}": v for k, v in self.metrics.items() if k.startswith("val/")}})
        record_run(self.bundle, logger.run_id)  # `moa register` logs into this run
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
        self.step = int(checkpoint["global_step"])


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.numel() == 1}

