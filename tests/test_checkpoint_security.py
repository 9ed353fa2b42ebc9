"""A checkpoint is user input: loading one never runs code. A checkpoint carrying a pickled payload (it writes a
marker file when unpickled) goes through the real ``moa fit --ckpt_path`` and through ``LogBundle``'s restore of
the best checkpoint; both refuse it with a short error naming the pickled object, and the marker never appears."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from moa.experts.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickled, it runs ``exec`` on code that writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",)


def armed(marker: Path) -> Payload:
    """A payload checked to be live: unpickling it (here, on purpose) writes the marker; then it is removed."""
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "payload ran"
    marker.unlink()
    return Payload(marker)


@pytest.mark.slow
def test_moa_fit_refuses_a_checkpoint_with_a_pickled_payload(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"epoch": 0, "global_step": 0, "state_dict": {}, "moa_resume": {"mlflow_run_id": armed(marker)}}, evil)
    script = Path(sys.executable).with_name("moa")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "moa.pipelines.cli.command"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([*command, "fit", "-c", str(ROOT / "configs" / "topk.yaml"), "--ckpt_path", str(evil),
                           "--trainer.max_steps", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert not marker.exists(), "loading the checkpoint ran its payload"
    assert done.returncode == 2, done.stdout + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("moa fit: error:")]
    assert len(errors) == 1 and f"the checkpoint {evil} holds a pickled object (exec)" in errors[0], done.stderr[-3000:]


class ScriptedModule(L.LightningModule):
    """One weight, a validation metric; its checkpoints carry ``payload`` when one is set."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.payload = None

    def training_step(self, batch, batch_idx):
        return (self.w * batch).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint):
        if self.payload is not None:
            checkpoint["payload"] = self.payload

    def write_bundle(self, directory, datamodule=None, *, metrics=None, base=None):
        return directory


def test_log_bundle_restores_the_best_checkpoint_as_data_only(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from moa.pipelines.tracking.log_bundle import LogBundle

    marker = tmp_path / "marker"
    module, data = ScriptedModule(), DataLoader(torch.ones(4, 1), batch_size=2)
    module.payload = armed(marker)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0,
                        callbacks=[LogBundle(str(tmp_path / "bundle"), ship="best"),
                                   ModelCheckpoint(monitor="val/score", mode="max", save_top_k=1)])
    with pytest.raises(UserError, match=r"holds a pickled object \(exec\), which moa does not load"):
        trainer.fit(module, data, data)
    assert Path(trainer.checkpoint_callback.best_model_path).is_file()
    assert not marker.exists(), "restoring the best checkpoint ran its payload"


def test_weights_only_false_is_refused_before_anything_is_built(tmp_path, monkeypatch, capsys):
    from moa.pipelines.cli.command import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", str(ROOT / "configs" / "topk.yaml"), "--weights_only", "false"]) == 2
    assert "moa fit: error: --weights_only false is refused" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
