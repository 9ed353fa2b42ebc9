"""Every causal-LM config (one per router, the tiny Llama preset) parses and trains 2 steps on target text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# 2 training steps and 1 validation batch (not fast_dev_run: LogBundle writes no bundle under it)
TWO_STEPS = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.log_every_n_steps", "1", "--trainer.logger", "false"]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
CAUSAL_CONFIGS = ["lora", "topk", "static", "poly", "mhr", "flylora", "remix", "hypelora"]


def write_tasks(folder: Path) -> None:
    """Four tasks with the real tasks' names and columns (text, label, task, target_text)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        rows = [{"text": f"title {i}", "label": "x", "task": ["genre", "decade", "age", "occupation"][i % 4],
                 "target_text": ["comedy", "drama"][(i // 4) % 2]} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_there_is_a_causal_config_per_router():
    from moa.routers import ROUTERS

    names = {p.stem.removeprefix("causal-") for p in (ROOT / "configs").glob("causal-*.yaml")}
    # xcross integrates recommenders; arrow and uniform train nothing: they compose experts trained elsewhere
    # (moa expert pool --router)
    assert names == set(CAUSAL_CONFIGS) and set(ROUTERS) - names == {"xcross", "arrow", "uniform"}


@pytest.mark.slow
@pytest.mark.parametrize("name", CAUSAL_CONFIGS)
def test_causal_config_parses_and_trains_two_steps(name, tmp_path, monkeypatch, fit_config):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_tasks(tmp_path / "data")
    fit_config(["-c", str(ROOT / "configs" / f"causal-{name}.yaml"), *TWO_STEPS,
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                *(f"--data.init_args.{s}={tmp_path / 'data' / f'{s}.jsonl'}" for s in ("train", "val", "test")),
                "--data.init_args.batch_size", "4"])
    # the config's LogBundle wrote the serving bundle: it generates for rows of two tasks in one batch
    import pandas as pd

    from moa.pipelines.bundle import load_service

    service = load_service(tmp_path / "runs" / "bundle")
    tasks = service.tasks[:2]
    answer = service.predict(pd.DataFrame({"prompt": ["a title", "a title"], "task": tasks, "max_new_tokens": [2.0, 3.0]}))
    assert answer["text"].map(type).eq(str).all() and len(answer) == 2
