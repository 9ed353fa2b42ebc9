"""The ``moa`` command: Lightning CLI (subclass mode) with MLflow on the embedded store, checkpoints and resume.

The end-to-end tests run the real console script in a subprocess, in a temporary working directory (so the
default ``./mlflow.db`` and ``./mlruns`` land there); the per-config checks run the CLI in-process.
"""

import contextlib
import io
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ROUTER_CONFIGS = ["topk", "static", "poly", "mhr", "flylora", "remix", "hypelora"]
SMALL = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.n_train", "128", "--data.init_args.n_val", "64", "--data.init_args.n_test", "64",
         "--trainer.log_every_n_steps", "1"]


@pytest.mark.parametrize("name", ROUTER_CONFIGS)
def test_router_config_prints_and_trains_one_step(name, tmp_path, monkeypatch, fit_config):
    from moa.pipelines.cli.command import main

    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["fit", "-c", str(CONFIGS / f"{name}.yaml"), "--print_config"]) == 0
    printed = out.getvalue()
    assert "class_path: moa.pipelines." in printed and "routing_stats:" in printed
    fit_config(["-c", str(CONFIGS / f"{name}.yaml"), "--trainer.fast_dev_run", "2", "--trainer.logger", "false", *SMALL])


def test_fit_logs_to_mlflow_then_test_resume_validate_and_predict(tmp_path, monkeypatch, moa_cli, mlflow_runs):
    config = str(CONFIGS / "topk.yaml")
    output = moa_cli(["fit", "-c", config, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",
                      "--trainer.logger.init_args.run_name", "null", *SMALL], cwd=tmp_path)

    # embedded store in the working directory: sqlite database + ./mlruns artifacts
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlruns").is_dir()
    client, runs = mlflow_runs(tmp_path / "mlflow.db", "moa-routers")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "topk-E4-k2-s0" and run.info.status == "FINISHED"  # the adapters and the seed
    tags = run.data.tags
    assert {k: tags[k] for k in ("moa.router", "moa.expert_kind", "moa.backbone", "moa.model_class", "moa.data_class")} \
        == {"moa.router": "topk", "moa.expert_kind": "lora", "moa.backbone": "tiny-bert",
            "moa.model_class": "moa.pipelines.kinds.classifier.module.MoAClassifier", "moa.data_class": "moa.pipelines.data.tokens.MultiTaskTokens"}
    import moa

    assert tags["moa.version"] == moa.__version__
    params = run.data.params  # the resolved config, prefixed by section; nothing unprefixed
    assert params["model.router"] == "topk" and params["model.n_experts"] == "4" and params["data.n_tasks"] == "4"
    assert params["model.router_options.aux_loss_coef"] == "0.01" and params["trainer.max_epochs"] == "2"
    assert params["trainer.callbacks"] == "ModelCheckpoint, ModelCheckpoint" and params["seed_everything"] == "0"
    assert not [k for k in params if "." not in k and k != "seed_everything"], sorted(params)
    trainable, total = int(params["moa.trainable_params"]), int(params["moa.total_params"])
    assert 0 < trainable < total
    assert f"trainable params: {trainable:,} || all params: {total:,} || trainable%: " in output
    steps = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(steps) == 8 and len({m.step for m in steps}) == len(steps)  # per step
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2  # per epoch
    assert len(client.get_metric_history(run.info.run_id, "train/loss_epoch")) == 2  # the epoch's mean
    usage = [run.data.metrics[f"routing/usage/expert_{e}"] for e in range(4)]
    assert sum(usage) == pytest.approx(1.0, abs=1e-4)
    assert 0 < run.data.metrics["routing/entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    heatmaps = [a.path for a in client.list_artifacts(run.info.run_id, "routing")]
    assert heatmaps == ["routing/usage_epoch000.png", "routing/usage_epoch001.png"]  # top-k: no task-skill matrix
    local = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert "moa.pipelines.kinds.classifier.module.MoAClassifier" in local.read_text()
    png = Path(client.download_artifacts(run.info.run_id, heatmaps[0], str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    checkpoints = tmp_path / "runs" / run.info.experiment_id / run.info.run_id / "checkpoints"
    last = checkpoints / "last.ckpt"
    assert last.is_file() and len(list(checkpoints.glob("best-epoch*.ckpt"))) == 1
    assert torch.load(last, weights_only=False)["global_step"] == 8

    # test (in-process: the same main() the console script calls): a run of its own, nested under the fit's run
    from moa.pipelines.cli.command import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["test", "-c", config, "--ckpt_path", str(last), "--trainer.limit_test_batches", "2", *SMALL]) == 0
    runs = mlflow_runs(tmp_path / "mlflow.db", "moa-routers")[1]
    tested = next(r for r in runs if r.info.run_id != run.info.run_id)
    assert len(runs) == 2 and tested.info.run_name == "topk-E4-k2-s0-test" and tested.info.status == "FINISHED"
    assert tested.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert {"test/loss", "test/accuracy"} <= set(tested.data.metrics) and tested.data.params["model.router"] == "topk"

    # resume for one more epoch, on a team store named by MLFLOW_TRACKING_URI: a new run there (the checkpoint's
    # run is not in that store), named after the adapters; nothing new in ./mlflow.db
    team = tmp_path / "team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{team}")
    assert main(["fit", "-c", config, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "4",
                 "--ckpt_path", str(last), *SMALL]) == 0
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert len(mlflow_runs(tmp_path / "mlflow.db", "moa-routers")[1]) == 2
    team_client, team_runs = mlflow_runs(team, "moa-routers")
    assert [(r.info.run_name, r.info.status) for r in team_runs] == [("topk-E4-k2-s0", "FINISHED")]
    resumed = team_runs[0]
    assert [m.value for m in team_client.get_metric_history(resumed.info.run_id, "epoch")][-1] == 2
    resumed_last = tmp_path / "runs" / resumed.info.experiment_id / resumed.info.run_id / "checkpoints" / "last.ckpt"
    assert torch.load(resumed_last, weights_only=False)["global_step"] == 12

    # validate and predict from the checkpoint; predict makes no MLflow run
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["validate", "-c", config, "--ckpt_path", str(resumed_last), "--trainer.logger", "false",
              "--trainer.limit_val_batches", "2", *SMALL])
    assert "val/loss" in out.getvalue() and "val/accuracy" in out.getvalue()

    predictions = tmp_path / "predictions.parquet"
    main(["predict", "-c", config, "--ckpt_path", str(last), "--trainer.callbacks+=moa.pipelines.cli.lightning_cli.ParquetPredictionWriter",
          f"--trainer.callbacks.output={predictions}", *SMALL])
    assert len(mlflow_runs(tmp_path / "mlflow.db", "moa-routers")[1]) == 2
    import pandas as pd

    frame = pd.read_parquet(predictions)
    assert len(frame) == 64 and set(frame.columns) == {"prediction", "probability"}
    assert frame["prediction"].isin([0, 1]).all() and (frame["probability"] >= 0.5 - 1e-6).all()


def test_poly_fit_logs_the_task_skill_matrix(tmp_path, monkeypatch, mlflow_runs):
    from moa.pipelines.cli.command import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["fit", "-c", str(CONFIGS / "poly.yaml"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
                 "2", "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.run_name", "null", *SMALL]) == 0
    client, runs = mlflow_runs(tmp_path / "mlflow.db", "moa-routers")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("poly-E4-s0", "FINISHED")]
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "routing")]
    assert "routing/task_skill_matrix.png" in artifacts
    png = Path(client.download_artifacts(runs[0].info.run_id, "routing/task_skill_matrix.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_overrides_and_bad_values(tmp_path, monkeypatch, capsys):
    from moa.pipelines.cli.command import main

    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0
    output = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "register", "serve", "batch", "poly", "flylora"):
        assert command in output
    assert main(["fit", "-c", str(CONFIGS / "topk.yaml"), "--model.init_args.router", "static",
                 "--model.init_args.router_options", "{key: task_ids}", "--print_config"]) == 0
    output = capsys.readouterr().out
    assert "router: static" in output and "key: task_ids" in output
    assert main(["fit", "-c", str(CONFIGS / "topk.yaml"), "--model.init_args.router", "nope",
                 "--trainer.logger", "false"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown router 'nope'" in error[0] and "flylora" in error[0]
    monkeypatch.setenv("MOA_DEBUG", "1")  # the traceback, for debugging
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        main(["fit", "-c", str(CONFIGS / "topk.yaml"), "--model.init_args.router", "nope", "--trainer.logger", "false"])
    assert not (tmp_path / "mlflow.db").exists()
