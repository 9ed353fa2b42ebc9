"""Training runs the adapted model in train mode and evaluation in eval mode, on a real pretrained backbone.

``AutoModel.from_pretrained`` returns the model in eval mode, ``attach`` keeps that mode and Lightning keeps each
submodule's mode; these tests fail if a fit then trains with routers, routing noise and dropout switched off.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import moa
from moa.lightning import ClassificationHead, MoAModule
from moa.pretrained import minilm_dir
from moa.pipelines.kinds.classifier.module import MoAClassifier


class ModeProbe(L.Callback):
    """Records, at every training and validation batch, the modes that matter and the routers' aux losses."""

    def __init__(self):
        self.train_batches: list[dict] = []
        self.val_batches: list[dict] = []

    @staticmethod
    def _modes(pl_module) -> dict:
        layers = list(pl_module.model.moa_layers().values())
        dropouts = [m for m in pl_module.model.modules() if isinstance(m, nn.Dropout)]
        return {
            "routers": {layer.router.training for layer in layers},
            "dropouts": {m.training for m in dropouts},
            "head": pl_module.head.training,
            "aux": dict(pl_module.model.aux_losses()),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_batches.append(self._modes(pl_module))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val_batches.append(self._modes(pl_module))


def minilm_batches(n: int = 8) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    texts = [f"movie number {i} is {'good' if i % 2 else 'bad'}" for i in range(n)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "task_ids": torch.tensor(i % 2), "labels": torch.tensor(i % 2)} for i in range(n)]
    return rows


def fit_with_probe(module: L.LightningModule, rows: list[dict]) -> ModeProbe:
    probe = ModeProbe()
    trainer = L.Trainer(max_steps=2, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe])
    loader = DataLoader(rows, batch_size=4)
    trainer.fit(module, loader, loader)
    return probe


def assert_train_then_eval(probe: ModeProbe) -> None:
    assert probe.train_batches and probe.val_batches
    for modes in probe.train_batches:
        assert modes["routers"] == {True} and modes["dropouts"] == {True} and modes["head"]
        assert "load_balance" in modes["aux"] and float(modes["aux"]["load_balance"].detach()) > 0
    for modes in probe.val_batches:  # the sanity check, and validation after training steps
        assert modes["routers"] == {False} and modes["dropouts"] == {False} and not modes["head"]


@pytest.mark.slow
def test_pretrained_minilm_trains_in_train_mode_and_validates_in_eval_mode(one_thread):
    from transformers import AutoModel

    base = AutoModel.from_pretrained(str(minilm_dir()))
    assert not base.training  # what users get from from_pretrained
    model = moa.attach(base, moa.MoAConfig(n_experts=4, r=4, router="topk", top_k=2, target_modules=["query", "value"]))
    module = MoAModule(model, head=ClassificationHead(base.config.hidden_size, 2))
    module.eval()  # even a module put in eval mode on purpose trains in train mode
    probe = fit_with_probe(module, minilm_batches())
    assert_train_then_eval(probe)


@pytest.mark.slow
def test_cli_classifier_on_minilm_trains_in_train_mode(one_thread):
    module = MoAClassifier(backbone="minilm", n_classes=2, n_experts=4, r=4, router="topk", top_k=2,
                           target_modules=["query", "value"])
    layers = module.model.moa_layers().values()
    assert {layer.router.training for layer in layers} == {False}  # the pretrained backbone arrives in eval mode
    probe = fit_with_probe(module, minilm_batches())
    assert_train_then_eval(probe)


@pytest.mark.slow
def test_model_and_data_seeds_are_separate_hyperparameters(tmp_path):
    """``seed`` (model) and ``data_seed`` (data) both reach the logged hparams; a shared name crashed the merge."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    root = Path(__file__).resolve().parents[1]
    moa_script = Path(sys.executable).with_name("moa")
    done = subprocess.run(
        [str(moa_script), "fit", "-c", str(root / "configs/topk.yaml"), "--model.init_args.seed", "2",
         "--data.init_args.data_seed", "1", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
         "--data.init_args.n_train", "64", "--data.init_args.n_val", "32", "--data.init_args.n_test", "32"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},  # the embedded store in tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moa-routers").experiment_id])
    params = run.data.params
    seeds = {key: value for key, value in params.items() if key.split("/")[-1].split(".")[-1] in ("seed", "data_seed")}
    assert sorted(seeds.values()) == ["1", "2"], params
