"""Resume: a ``moa fit`` killed with SIGKILL mid-epoch and resumed from ``last.ckpt`` ends bit-identical to the
uninterrupted fit, in the same MLflow run, and no run is left RUNNING (the real CLI in subprocesses, a real store)."""

import signal
import subprocess
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.n_train", "128", "--data.init_args.n_val", "64", "--trainer.log_every_n_steps", "1"]
BATCHES, EPOCHS, EVERY = 4, 3, 3  # last.ckpt at steps 3, 6, 9 (all mid-epoch) and 12 (the end)
ARGS = ["fit", "-c", str(CONFIGS / "topk.yaml"), "--trainer.max_epochs", str(EPOCHS),
        "--trainer.limit_train_batches", str(BATCHES), "--trainer.callbacks.every_n_train_steps", str(EVERY),
        "--trainer.logger.init_args.run_name", "null", *SMALL]  # the last callback of the config: last.ckpt


def last_checkpoint(cwd: Path) -> Path:
    found = list((cwd / "runs").glob("*/*/checkpoints/last.ckpt"))
    assert len(found) == 1, found
    return found[0]


def trainable(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def test_killed_mid_epoch_fit_resumes_bit_identical_in_the_same_run(tmp_path, moa_cli, moa_start, mlflow_runs):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    log = (tmp_path / "whole.log").open("w")
    reference = moa_start(ARGS, whole, stdout=log, stderr=subprocess.STDOUT)
    victim = moa_start(ARGS, killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it as soon as its first checkpoint (step 3 of epoch 0) is written
        deadline = time.monotonic() + 300
        while not list((killed / "runs").glob("*/*/checkpoints/last.ckpt")):
            assert victim.poll() is None, "the fit to kill ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        victim.kill()
    assert victim.returncode == -signal.SIGKILL
    checkpoint = last_checkpoint(killed)
    step = torch.load(checkpoint, weights_only=False)["global_step"]
    assert step in (3, 6, 9), f"killed at step {step}: not mid-epoch"
    client, runs = mlflow_runs(killed / "mlflow.db", "moa-routers")
    assert [r.info.status for r in runs] == ["RUNNING"]  # SIGKILL: nobody ended it
    killed_run = runs[0].info.run_id

    moa_cli([*ARGS, "--ckpt_path", str(checkpoint)], cwd=killed, timeout=600)
    assert reference.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-4000:]

    # the same MLflow run, ended FINISHED, and no other run
    client, runs = mlflow_runs(killed / "mlflow.db", "moa-routers")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(killed_run, "FINISHED")]
    assert runs[0].info.run_name == "topk-E4-k2-s0"
    steps = [m.step for m in client.get_metric_history(killed_run, "train/loss")]
    assert max(steps) == BATCHES * EPOCHS - 1 and len(client.get_metric_history(killed_run, "val/loss")) == EPOCHS

    # bit-identical trainable weights (checkpoints hold the trainable state) after the last step
    assert last_checkpoint(killed) == checkpoint
    final, expected = torch.load(checkpoint, weights_only=False), torch.load(last_checkpoint(whole), weights_only=False)
    assert final["global_step"] == expected["global_step"] == BATCHES * EPOCHS
    assert final["state_dict"].keys() == expected["state_dict"].keys() and final["state_dict"]
    different = [k for k, v in expected["state_dict"].items() if not torch.equal(v, final["state_dict"][k])]
    assert not different, f"weights differ after the resume: {different}"
