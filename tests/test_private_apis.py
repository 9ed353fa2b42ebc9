"""The private Lightning parts moa still uses (no public way exists), each checked for what moa relies on, with a
failure that names it. pyproject.toml pins lightning below its next minor version; before raising the bound, run
these. Everything else moa needs from Lightning and MLflow goes through public APIs (``logger.run_id``,
``logger.experiment``, ``MlflowClient.tracking_uri``, ``mlflow.get_registry_uri()``, ``trainer_defaults``
callbacks, ``LightningCLI.parse_arguments``, torch / numpy / random RNG states).

* ``MLFlowLogger._run_name`` / ``_run_id`` / ``_initialized``: :class:`moa.pipelines.tracking.logger.MLflowLogger`
  names, continues or nests its run before it starts (the constructor's ``run_name`` / ``run_id``, set late).
* ``trainer.fit_loop._data_fetcher`` (iterated, advanced, its ``fetched`` count reset):
  :class:`moa.pipelines.tracking.resume.ResumeState` replays an interrupted epoch's loader.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader


def require(condition: bool, api: str, user: str) -> None:
    if not condition:
        pytest.fail(f"Lightning private API {api} moved or changed; {user} relies on it "
                    "(see tests/test_private_apis.py)", pytrace=False)


def test_mlflow_logger_run_choice_attributes(tmp_path):
    from mlflow import MlflowClient

    from moa.pipelines.tracking.logger import MLflowLogger

    user = "moa.pipelines.tracking.logger.MLflowLogger"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fresh = MLflowLogger(experiment_name="private", tracking_uri=uri, run_name="given")
    for attribute, value in (("_run_name", "given"), ("_run_id", None), ("_initialized", False)):
        require(getattr(fresh, attribute, ...) == value, f"MLFlowLogger.{attribute}", user)

    existing = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("other")).info.run_id
    continued = MLflowLogger(experiment_name="private", tracking_uri=uri)
    assert continued.continue_run(existing)
    require(continued.run_id == existing, "MLFlowLogger._run_id (set before the run starts: continue that run)", user)
    require(getattr(continued, "_initialized", False) is True, "MLFlowLogger._initialized (True once started)", user)

    named = MLflowLogger(experiment_name="private", tracking_uri=uri)
    named.name_by_default("by-default")
    run = MlflowClient(uri).get_run(named.run_id)
    require(run.info.run_name == "by-default", "MLFlowLogger._run_name (set before the run starts: its name)", user)


class Probe(L.Callback):
    """Checks at train start what ResumeState does with the fit loop's data fetcher."""

    def on_train_start(self, trainer, pl_module):
        user = "moa.pipelines.tracking.resume.ResumeState"
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        require(fetcher is not None, "trainer.fit_loop._data_fetcher", user)
        require(isinstance(getattr(fetcher, "fetched", None), int), "trainer.fit_loop._data_fetcher.fetched", user)
        iter(fetcher)  # the epoch's iterator, remade
        first = next(fetcher)
        batch = first[0] if isinstance(first, tuple) else first
        require(torch.equal(batch, torch.arange(2.0).view(2, 1)),
                "trainer.fit_loop._data_fetcher (iter / next give the loader's batches)", user)
        iter(fetcher)  # back to the start for the fit


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (self.w * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_loop_data_fetcher(tmp_path):
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Probe()])
    trainer.fit(Tiny(), DataLoader(torch.arange(4.0).view(4, 1), batch_size=2))
    assert trainer.global_step == 2
