"""The ``moa`` command: Lightning CLI training plus the registry and serving steps.

    moa fit -c configs/topk.yaml                         # train; MLflow run on ./mlflow.db + ./mlruns
    moa fit -c configs/topk.yaml --print_config          # the resolved config
    moa fit -c configs/topk.yaml --ckpt_path last.ckpt   # resume
    moa validate|test|predict -c configs/topk.yaml --ckpt_path <ckpt>
    moa register --model-dir <saved recommender> ...     # see ``moa register --help``
    moa serve --name <registered model>                  # REST server on 127.0.0.1
    moa batch --model-uri models:/<name>@champion ...    # top-k for every user to Parquet

Models and data modules are chosen by class path in the config (subclass mode): any ``LightningModule`` /
``LightningDataModule``, e.g. :class:`moa.pipelines.modules.MoAClassifier` with
:class:`moa.pipelines.data.MultiTaskTokens`. The logger defaults to :class:`moa.pipelines.tracking.MLflowLogger`
(``$MLFLOW_TRACKING_URI`` or the embedded sqlite store); the routing statistics callback is always on
(configure it under ``routing_stats:``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .tracking import MLflowSaveConfig, RoutingStats

LOGGER_DEFAULT = {"class_path": "moa.pipelines.tracking.MLflowLogger", "init_args": {"experiment_name": "moa"}}


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
                raise TypeError(f"ParquetPredictionWriter needs predict_step to return a dict of tensors, got {type(batch).__name__}")
            for key, value in batch.items():
                value = value.detach().cpu() if isinstance(value, torch.Tensor) else value
                columns.setdefault(key, []).extend(value.tolist() if hasattr(value, "tolist") else list(value))
        path = self.output
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(columns).to_parquet(path, index=False)


class MoACLI(LightningCLI):
    """LightningCLI with MLflow by default, the routing statistics callback and the MLflow-aware config saver."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RoutingStats, "routing_stats")


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
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": LOGGER_DEFAULT},
        parser_kwargs={"epilog": EPILOG},
        args=None if args is None else list(args),
        run=run,
    )


def lightning_main(args: Sequence[str]) -> int:
    """``moa fit|validate|test|predict ...``: the Lightning CLI."""
    run_cli(args)
    return 0


def main(args: Sequence[str] | None = None) -> int:
    """The ``moa`` command (see :mod:`moa.pipelines.command`)."""
    from .command import main as command_main

    return command_main(args)


if __name__ == "__main__":
    sys.exit(main())
