"""What a ``moa fit`` / ``moa test`` of the real CLI records and prints: the seed in the run's name and tags, the
best step with validation every N steps, the checkpoint a test evaluated, plain progress lines when stdout is not a
terminal, a model summary that tells the modules' real mode; the task count of Poly / MHR taken from the data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
TASKS = {"genre": ("comedy", "drama"), "decade": ("1990s", "before_1970"), "age": ("under_25", "50_plus")}


def three_tasks(folder: Path) -> list[str]:
    """Three tasks of two labels (columns text, label, task); the data args of the text configs."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 24), ("val", 6), ("test", 6)):
        rows = []
        for i in range(n):
            task = list(TASKS)[i % 3]
            label = TASKS[task][(i // 3) % 2]
            rows.append({"text": f"title {i} about {label}", "label": label, "task": task})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"--data.init_args.{s}={folder / f'{s}.jsonl'}" for s in ("train", "val", "test")]


def runs_of(db: Path, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def summary_count(output: str, mode: str) -> int:
    """The number in the model summary's line ``Modules in <mode> mode`` (rich or plain layout)."""
    line = next(line for line in output.splitlines() if f"Modules in {mode} mode" in line)
    return int(re.search(r"\d+", line).group())


@pytest.mark.slow
def test_lora_fit_and_test_record_seed_best_step_checkpoint_and_print_plain_progress(tmp_path, monkeypatch, capsys):
    from moa.pipelines.cli.command import main
    from moa.pipelines.cli.lightning_cli import callback_override

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = str(CONFIGS / "text-lora.yaml")
    data = [*three_tasks(tmp_path / "data"), "--data.init_args.batch_size", "4"]
    ship_best = callback_override(config, "moa.pipelines.tracking.log_bundle.LogBundle", ship="best")
    # 6 batches, validation every 2 steps: the best weights are those of step 2, 4 or 6, all in epoch 0
    assert main(["fit", "-c", config, *data, "--trainer.max_epochs", "1", "--trainer.val_check_interval", "2",
                 *ship_best]) == 0
    output = capsys.readouterr().out  # not a terminal: plain lines, no redrawn bar
    assert re.search(r"^epoch 0  batch 6/6  step 6  train/loss=[\d.]+  [\d.]+ it/s$", output, re.M), output
    for step in (2, 4, 6):
        assert re.search(rf"^epoch 0  validation at step {step}: val/loss=[\d.]+$", output, re.M), output
    assert "Epoch 0/0" not in output  # the rich bar's line
    # MiniLM comes in eval mode from from_pretrained; the summary, printed before the fit's hook, tells the truth
    assert summary_count(output, "eval") == 0 and summary_count(output, "train") > 0

    client, runs = runs_of(tmp_path / "mlflow.db", "moa-text")
    (run,) = runs
    assert run.info.run_name == "lora-E1-s0" and run.data.tags["seed"] == "0"
    assert run.data.params["moa.trainable_params"] == "24576"  # PEFT's count on these targets (the issue's)
    metrics = run.data.metrics
    assert not [k for k in metrics if k.startswith(("routing/", "train/aux")) or k == "train/routing_entropy"]
    (best,) = (tmp_path / "runs").glob("*/*/checkpoints/best-*.ckpt")
    checkpoint = torch.load(best, weights_only=True)
    assert metrics["best/epoch"] == 0 and metrics["best/step"] == checkpoint["global_step"]
    val_losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
    assert len(val_losses) == 3 and metrics["best/val/loss"] == pytest.approx(min(val_losses.values()))

    assert main(["test", "-c", config, *data, "--ckpt_path", str(best.relative_to(tmp_path))]) == 0
    assert re.search(r"^test: test/loss=[\d.]+$", capsys.readouterr().out, re.M)
    tested = next(r for r in runs_of(tmp_path / "mlflow.db", "moa-text")[1] if r.info.run_id != run.info.run_id)
    assert tested.info.run_name == "lora-E1-s0-test" and tested.data.tags["ckpt_path"] == str(best.resolve())
    assert tested.data.tags["mlflow.parentRunId"] == run.info.run_id and tested.data.tags["seed"] == "0"


@pytest.mark.parametrize("config", ["text-poly.yaml", "text-mhr.yaml"])
def test_poly_and_mhr_take_the_task_count_from_the_data(config, tmp_path, monkeypatch):
    from moa.experts.errors import UserError
    from moa.pipelines.cli.lightning_cli import run_cli

    monkeypatch.chdir(tmp_path)
    args = ["-c", str(CONFIGS / config), *three_tasks(tmp_path / "data"), "--trainer.logger", "false"]
    options = "{n_heads: 4}" if "mhr" in config else "{}"
    cli = run_cli([*args, "--model.init_args.router_options", options], run=False)
    assert len(cli.datamodule.task_names) == 3  # the shipped configs say 4
    assert cli.model.model.config.router_options["n_tasks"] == 3
    assert cli.model.hparams["router_options"]["n_tasks"] == 3  # a checkpoint rebuilds it without the data
    routers = [layer.router for layer in cli.model.model.moa_layers().values()]
    assert routers and all(router.logits_module.logits.shape[0] == 3 for router in routers)
    with pytest.raises(UserError, match=r"n_tasks=4 but the data has 3 tasks \['age', 'decade', 'genre'\]"):
        run_cli(args, run=False)  # the config's n_tasks: 4, given explicitly


def test_the_token_tasks_link_too(tmp_path, monkeypatch):
    from moa.pipelines.cli.lightning_cli import run_cli

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["-c", str(CONFIGS / "poly.yaml"), "--data.init_args.n_tasks", "6", "--model.init_args.router_options",
                   "{}", "--trainer.logger", "false"], run=False)
    assert cli.model.model.config.router_options["n_tasks"] == cli.datamodule.n_tasks == 6


def test_plain_progress_prints_a_line_every_n_steps_and_at_the_epoch_end(capsys):
    import lightning as L
    from torch.utils.data import DataLoader

    from moa.pipelines.cli.progress import PlainProgress

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch).pow(2).mean()
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    progress = PlainProgress(every_n_steps=2, every_n_seconds=1e9)  # the clock never decides here
    trainer = L.Trainer(max_epochs=2, callbacks=[progress], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(), DataLoader(torch.randn(5, 2), batch_size=1))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    found = [re.fullmatch(r"epoch (\d)  batch (\d)/5  step (\d+)  train/loss=[\d.e-]+  [\d.]+ it/s", line) for line in lines]
    assert all(found), lines
    assert [m.groups() for m in found] == [("0", "2", "2"), ("0", "4", "4"), ("0", "5", "5"),
                                           ("1", "2", "7"), ("1", "4", "9"), ("1", "5", "10")]
    with pytest.raises(ValueError, match="every_n_steps >= 1"):
        PlainProgress(every_n_steps=0)


def test_a_static_router_with_fewer_experts_than_the_datas_tasks_is_refused_before_the_backbone_loads(
        tmp_path, monkeypatch):
    from moa.experts.errors import UserError
    from moa.pipelines.cli.lightning_cli import run_cli
    from moa.pipelines.kinds.classifier import module

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built before the check")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(module, "build_backbone", no_backbone)
    args = ["-c", str(CONFIGS / "text-static.yaml"), *three_tasks(tmp_path / "data"), "--trainer.logger", "false"]
    with pytest.raises(UserError, match=r"n_experts=2 but the data has 3 tasks \['age', 'decade', 'genre'\].*n_experts to 3"):
        run_cli([*args, "--model.init_args.n_experts", "2"], run=False)


def test_plain_progress_counts_the_batches_max_steps_leaves_in_the_epoch(capsys):
    """With max_steps ending the epoch early, Lightning's count of the epoch's batches shrinks as steps are done
    (a log read '27/3'); the line keeps the count the epoch started with."""
    import lightning as L
    from torch.utils.data import DataLoader

    from moa.pipelines.cli.progress import PlainProgress

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=5, callbacks=[PlainProgress(every_n_steps=2, every_n_seconds=1e9)], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(), DataLoader(torch.randn(10, 2), batch_size=1))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [re.search(r"batch (\d+/\d+)", line).group(1) for line in lines] == ["2/5", "4/5", "5/5"], lines
