"""The Lightning CLI of ``moa fit|validate|test|predict`` (:class:`MoACLI`, :func:`run_cli`); the ``moa`` command
that dispatches to it and to the registry and serving steps is :mod:`moa.pipelines.cli.command`.

    moa fit -c configs/topk.yaml                         # train; MLflow run on ./mlflow.db + ./mlruns
    moa fit -c configs/topk.yaml --print_config          # the resolved config
    moa fit -c configs/topk.yaml --ckpt_path last.ckpt   # resume
    moa validate|test|predict -c configs/topk.yaml --ckpt_path <ckpt>
    moa register --model-dir <saved recommender> ...     # see ``moa register --help``
    moa serve --name <registered model>                  # REST server on 127.0.0.1
    moa batch --model-uri models:/<name>@champion ...    # top-k for every user to Parquet

Models and data modules are chosen by class path in the config (subclass mode): any ``LightningModule`` /
``LightningDataModule``, e.g. :class:`moa.pipelines.kinds.classifier.module.MoAClassifier` with
:class:`moa.pipelines.data.tokens.MultiTaskTokens`. The logger defaults to :class:`moa.pipelines.tracking.logger.MLflowLogger`
(``$MLFLOW_TRACKING_URI`` or the embedded sqlite store); the routing statistics callback is always on
(configure it under ``routing_stats:``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import MLFlowLogger

from moa.experts.errors import UserError, UserTypeError
from moa.pipelines.cli.args import MoAArgumentParser, link_task_count
from moa.pipelines.cli.progress import PlainProgress
from moa.pipelines.tracking.config import MLflowSaveConfig, run_name
from moa.pipelines.tracking.logger import MLflowLogger, find_moa_model
from moa.pipelines.tracking.resume import ResumeState, checkpoint_run_id
from moa.pipelines.tracking.routing_stats import RoutingStats

LOGGER_DEFAULT = {"class_path": "moa.pipelines.tracking.logger.MLflowLogger", "init_args": {"experiment_name": "moa"}}


class ParquetPredictionWriter(BasePredictionWriter):
    """Write what ``predict_step`` returns (dicts of per-sample tensors) to one Parquet file per rank."""

    def __init__(self, output: str = "predictions.parquet"):
        super().__init__(write_interval="epoch")
        self.output = Path(output)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        import pandas as pd

        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        columns: dict[str, list] = {}
        for batch in batches:
            if not isinstance(batch, dict):
                raise UserTypeError(f"ParquetPredictionWriter needs predict_step to return a dict of tensors, got {type(batch).__name__}")
            for key, value in batch.items():
                value = value.detach().cpu() if isinstance(value, torch.Tensor) else value
                columns.setdefault(key, []).extend(value.tolist() if hasattr(value, "tolist") else list(value))
        path = self.output
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(columns).to_parquet(path, index=False)


class MoACLI(LightningCLI):
    """LightningCLI with MLflow by default, the routing statistics callback, the MLflow-aware config saver and
    exact resume (:class:`ResumeState`, always on).

    MLflow runs: ``fit`` names its run after the adapters and the seed (:func:`run_name`, e.g. ``topk-E4-k2-s0``)
    unless the logger has a ``run_name``; resumed from a checkpoint (``--ckpt_path``) of a run in the same store, it continues
    that run. ``validate`` / ``test`` log to a run of their own, nested under the checkpoint's run when the store
    has it and tagged with the checkpoint (``ckpt_path``); ``predict`` makes no MLflow run.

    Before the classes are built, Poly / MHR take ``n_tasks`` from the data module (:func:`link_task_count`). A
    parse error is one line (:class:`MoAArgumentParser`); with stdout not a terminal, progress is plain lines.

    A checkpoint is data: ``--ckpt_path`` is only ever read with ``weights_only=True`` (by moa for its run id, and
    by Lightning, URLs included); one holding pickled objects is refused with a one-line error before Lightning
    reads it, and so is ``--weights_only false``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RoutingStats, "routing_stats")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then read ``--ckpt_path`` as data only, before Lightning reads it (its run id, for
        :meth:`before_fit`): a checkpoint holding pickled objects gets a one-line error here."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else {}
        if config.get("weights_only") is False:
            raise UserError("--weights_only false is refused: moa loads checkpoints as data only (unpickling "
                            "objects from a checkpoint could run code)")
        self.checkpoint_run_id = checkpoint_run_id(config.get("ckpt_path"))

    def before_instantiate_classes(self) -> None:
        """Text data without a tokenizer takes the model's backbone's; a named one must match the backbone's
        vocabulary, checked before the model's weights load (:func:`moa.pipelines.data.text.fill_tokenizer`). A
        router that routes by task takes the data's task count (:func:`link_task_count`)."""
        from moa.pipelines.data.text import fill_tokenizer

        config = self.config[self.subcommand] if self.subcommand else self.config
        fill_tokenizer(config.get("data"), config.get("model"))
        self._counted_data = link_task_count(config.get("data"), config.get("model"))  # Poly / MHR's n_tasks

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._counted_data is not None:  # the data module that read the files to count the tasks: no second read
            self.datamodule = self._counted_data

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer; when stdout is not a terminal (a log file), Lightning's default progress bar, which draws
        nothing useful there, becomes plain lines (:class:`PlainProgress`). A progress bar the config names stays."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        named = [c for c in (config.get("trainer") or {}).get("callbacks") or [] if isinstance(c, ProgressBar)]
        trainer = super().instantiate_trainer(**kwargs)  # (the trainer's callbacks extend the config's list)
        bar = trainer.progress_bar_callback
        if bar is not None and not named and not sys.stdout.isatty():
            trainer.callbacks[trainer.callbacks.index(bar)] = PlainProgress()
        return trainer

    def _load_as_data(self) -> None:
        self.config_init[self.subcommand]["weights_only"] = True  # Lightning's default, except for URLs

    def _mlflow_run(self, stage: str) -> None:
        self._load_as_data()
        source = self.checkpoint_run_id
        logger = next((lg for lg in self.trainer.loggers if isinstance(lg, MLflowLogger)), None)
        if logger is None:
            return
        model = find_moa_model(self.model)
        name = run_name(model, self._config().get("seed_everything")) if model is not None else None
        if stage != "fit":
            logger.stage_run(stage, source, name, self._config().get("ckpt_path"))
        elif source is None or not logger.continue_run(source):
            logger.name_by_default(name)

    def _config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_fit(self) -> None:
        self._mlflow_run("fit")
        # the fit trains in train mode (MoAModule.on_fit_start); a backbone from from_pretrained arrives in eval
        # mode, and Lightning's model summary, printed before that hook, would count its modules as in eval mode
        self.model.train()

    def before_validate(self) -> None:
        self._mlflow_run("validate")

    def before_test(self) -> None:
        self._mlflow_run("test")

    def before_predict(self) -> None:  # no metrics: no run
        self._load_as_data()
        self.trainer.loggers = [lg for lg in self.trainer.loggers if not isinstance(lg, MLFlowLogger)]


EPILOG = "more commands: 'moa --help' lists them all (register, serve, batch); MOA_DEBUG=1 shows tracebacks"


def run_cli(args: Sequence[str] | None = None, run: bool = True) -> MoACLI:
    """Run a Lightning subcommand (``fit``, ``validate``, ...) and return the CLI (its ``model``, ``datamodule``,
    ``trainer``); ``args=None`` reads ``sys.argv``. ``run=False`` only builds them (``args`` without subcommand)."""
    return MoACLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=MLflowSaveConfig,
        parser_class=MoAArgumentParser,  # a typo in a config: one line naming it, not the usage first
        save_config_kwargs={"overwrite": True},
        # ResumeState: a persistent callback (after the config's and routing_stats); MLflowSaveConfig logs hparams
        trainer_defaults={"logger": LOGGER_DEFAULT, "enable_autolog_hparams": False, "callbacks": [ResumeState()]},
        parser_kwargs={"epilog": EPILOG},
        args=None if args is None else list(args),
        run=run,
    )


def callback_override(config: str | Path, class_path: str, **init_args) -> list[str]:
    """``["--trainer.callbacks", <json>]``: the callbacks of ``config`` with the init args of the one whose
    ``class_path`` is given updated (a command line cannot reach into one entry of a config's list)."""
    import json

    import yaml

    callbacks = (yaml.safe_load(Path(config).read_text()).get("trainer") or {}).get("callbacks") or []
    matches = [c for c in callbacks if isinstance(c, dict) and c.get("class_path") == class_path]
    if len(matches) != 1:
        raise UserError(f"{config} has {len(matches)} callbacks of class {class_path}; expected one")
    matches[0]["init_args"] = {**(matches[0].get("init_args") or {}), **init_args}
    return ["--trainer.callbacks", json.dumps(callbacks)]


def lightning_main(args: Sequence[str] | None) -> int:
    """``moa fit|validate|test|predict ...``: the Lightning CLI (``None``: the arguments of ``sys.argv``)."""
    run_cli(args)
    return 0
