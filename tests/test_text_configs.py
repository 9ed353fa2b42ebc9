"""The MiniLM text-classifier configs (``configs/text-*.yaml``, the ml-100k text tasks): each parses and trains 2 steps
on a tiny generated dataset of the same shape (four tasks, named labels), and the expert weights change."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
# 2 training steps and 1 validation batch (not fast_dev_run: LogBundle writes no bundle under it)
TWO_STEPS = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.log_every_n_steps", "1", "--trainer.logger", "false"]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
TEXT_CONFIGS = ["lora", "topk", "static", "poly", "mhr", "flylora", "remix", "hypelora"]


def tiny_tasks(folder: Path) -> None:
    """Four tasks with the real tasks' names (columns text, label, task, target_text), two labels each."""
    folder.mkdir(parents=True, exist_ok=True)
    words = {"genre": ("comedy", "drama"), "decade": ("1990s", "before_1970"), "age": ("under_25", "50_plus"),
             "occupation": ("student", "technical")}
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        rows = []
        for i in range(n):
            task = list(words)[i % 4]
            label = words[task][(i // 4) % 2]
            rows.append({"text": f"title {i} about {label}", "label": label, "task": task, "target_text": label})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
@pytest.mark.parametrize("name", TEXT_CONFIGS)
def test_text_config_parses_and_trains_two_steps(name, tmp_path, monkeypatch, fit_config):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tiny_tasks(tmp_path / "data")
    config = ROOT / "configs" / f"text-{name}.yaml"
    text = config.read_text()
    assert "class_path: moa.pipelines.data.text.TextData" in text and "n_classes" not in text
    cli = fit_config(["-c", str(config), *TWO_STEPS, "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false",
                      *(f"--data.init_args.{split}={tmp_path / 'data' / f'{split}.jsonl'}" for split in ("train", "val", "test")),
                      "--data.init_args.batch_size", "4"])
    assert cli.model.model.config.target_modules  # the MoA config came from the file
    assert cli.model.head.label_counts == [2, 2, 2, 2]  # one label set per task, from the data
    # the config's LogBundle wrote the serving bundle: it answers in names
    from moa.pipelines.bundle import load_service

    answer = load_service(tmp_path / "runs" / "bundle").predict(
        pd.DataFrame({"text": ["title 1 about drama", "title 2 about student"], "task": ["genre", "occupation"]}))
    assert list(answer["labels"]) == [["comedy", "drama"], ["student", "technical"]]
    assert answer.loc[0, "label"] in ("comedy", "drama") and answer.loc[1, "label"] in ("student", "technical")
