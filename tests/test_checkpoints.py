"""Lightning checkpoints of moa modules hold the adapters and heads, not the frozen base model (PEFT's habit), and
restore exactly into a freshly built module; the parameter summary counts what trains."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from moa.pipelines.data.tokens import MultiTaskTokens
from moa.pipelines.kinds.classifier.module import MoAClassifier


def classifier(**overrides) -> MoAClassifier:
    options = dict(backbone="tiny-bert", n_classes=2, n_experts=4, r=4, router="topk", top_k=2,
                   backbone_options={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4})
    return MoAClassifier(**{**options, **overrides})


def fit(module, tmp_path, steps=3):
    data = MultiTaskTokens(n_train=64, n_val=16, n_test=16, batch_size=16)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(module, data)
    return trainer, data


def test_checkpoint_holds_adapters_and_head_not_the_frozen_base(tmp_path, one_thread):
    module = classifier()
    trainer, data = fit(module, tmp_path)
    path = trainer.checkpoint_callback.best_model_path
    state = torch.load(path, weights_only=False)["state_dict"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert trainable <= set(state)  # every trainable weight (experts, routers, head) ...
    assert not frozen & set(state)  # ... and none of the frozen base
    saved = sum(v.numel() for v in state.values())
    base = sum(p.numel() for n, p in module.named_parameters() if n in frozen)
    assert saved < base / 5

    fresh = classifier()  # the base is rebuilt from the backbone (same seed), the rest from the checkpoint
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    restored = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    restored.validate(fresh, data, ckpt_path=path, verbose=False)
    for name, param in fresh.named_parameters():
        torch.testing.assert_close(param, dict(module.named_parameters())[name], rtol=0, atol=0)
    assert any(not torch.equal(before[n], p) for n, p in fresh.named_parameters() if n in trainable)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path, one_thread):
    module = classifier()
    trainer, data = fit(module, tmp_path, steps=1)
    other = classifier(target_modules=["query", "value", "key"])  # more adapted layers than were saved
    with pytest.raises(ValueError, match="lacks adapter weights"):
        L.Trainer(logger=False, enable_progress_bar=False).validate(
            other, data, ckpt_path=trainer.checkpoint_callback.best_model_path, verbose=False)


def test_print_trainable_parameters_counts_independently(capsys):
    module = classifier()
    model = module.model
    line = model.print_trainable_parameters()
    pools = sum(p.numel() for layer in model.moa_layers().values() for p in layer.pool.parameters())
    routers = sum(p.numel() for layer in model.moa_layers().values() for p in layer.router.parameters())
    total = sum(p.numel() for p in model.model.parameters())  # base + MoA layers (they live inside it)
    assert line == capsys.readouterr().out.strip()
    assert line.startswith(f"trainable params: {pools + routers:,} || all params: {total:,} || trainable%: ")


class ScriptedModule(L.LightningModule):
    """One weight that becomes the epoch number; a scripted validation metric per epoch; a bundle that records
    the weight and metrics it was written with."""

    SCORES = [0.2, 0.9, 0.4, 0.1]  # epoch 1 is the best

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.written = None

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.w.fill_(float(self.current_epoch))
        return (self.w * 0.0).sum() + batch.sum() * 0.0

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.SCORES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def write_bundle(self, directory, datamodule=None, *, metrics=None, base=None):
        self.written = (float(self.w), dict(metrics))
        return directory


@pytest.mark.parametrize("ship", ["best", "last"])
def test_log_bundle_ships_the_best_checkpoint_with_its_own_metrics(tmp_path, ship, one_thread):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from moa.pipelines.tracking.log_bundle import LogBundle

    module, data = ScriptedModule(), DataLoader(torch.zeros(4, 1), batch_size=2)
    bundle = LogBundle(str(tmp_path / "bundle"), ship=ship)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0,
                        callbacks=[bundle, ModelCheckpoint(monitor="val/score", mode="max", save_top_k=1)])
    trainer.fit(module, data, data)
    weight, metrics = module.written
    if ship == "best":  # the weights and figures of epoch 1, not of the last epoch
        assert weight == 1.0 and metrics["val/score"] == pytest.approx(0.9) and bundle.epoch == 1
    else:
        assert weight == 3.0 and metrics["val/score"] == pytest.approx(0.1) and bundle.epoch == 3


def test_log_bundle_ship_best_needs_a_monitoring_checkpoint(tmp_path):
    from moa.pipelines.tracking.log_bundle import LogBundle

    data = DataLoader(torch.zeros(4, 1), batch_size=2)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        callbacks=[LogBundle(str(tmp_path / "b"), ship="best")], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a ModelCheckpoint with a monitor"):
        trainer.fit(ScriptedModule(), data, data)
