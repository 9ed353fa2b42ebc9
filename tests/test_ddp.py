"""Scale-out: the same router config trains with Lightning's DDP strategy, 2 CPU processes over gloo.

Runs the real ``moa`` console script in a subprocess (Lightning re-launches it for rank 1), with MLflow logging
on the embedded store from rank 0 only; and a per-task classifier whose ranks validate on different numbers of
rows (``ddp_classifier_script.py``), which must log the metrics of all rows.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def launch_env() -> dict[str, str]:
    """This environment without what would make Lightning think it was already launched."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_fit_with_ddp_on_two_cpu_processes(tmp_path):
    script = Path(sys.executable).with_name("moa")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "moa.pipelines.cli.command"]
    args = ["fit", "-c", str(ROOT / "configs" / "topk.yaml"), "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--data.init_args.n_train", "64",
            "--data.init_args.n_val", "32", "--data.init_args.batch_size", "16", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    done = subprocess.run([*command, *args], cwd=tmp_path, env=launch_env(), capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "distributed_backend=gloo" in output and "MEMBER: 1/2" in output and "MEMBER: 2/2" in output

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("moa-routers")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # rank 0 logs, rank 1 does not start a run
    run = runs[0]
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2
    # each rank sees half of the 64 samples: 2 batches of 16 per epoch
    last = tmp_path / "runs" / experiment.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 4 and checkpoint["epoch"] == 1


def test_classifier_validation_metrics_are_global_under_ddp(tmp_path):
    script = Path(__file__).with_name("ddp_classifier_script.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=launch_env(),
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "sync_dist=True" not in output  # no Lightning warning that an epoch metric is rank-local
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    logged, whole, shards = result["logged"], result["global"], result["shards"]
    # the value of all 24 rows, counted on one process from the trained module's logits
    for name, value in whole.items():
        assert logged[name] == pytest.approx(value, abs=1e-5), name
    assert result["best_score"] == pytest.approx(whole["val/b/accuracy"], abs=1e-6)  # what the checkpoint saw
    # neither rank 0's shard (7 rows) nor the mean of the two shards' means would have passed
    assert any(abs(shards[0][name] - value) > 0.05 for name, value in whole.items())
    mean_of_means = (shards[0]["val/accuracy"] + shards[1]["val/accuracy"]) / 2
    assert abs(mean_of_means - whole["val/accuracy"]) > 0.01
