"""Bundles reference their base instead of copying it: a fit of the real SmolLM2 logs a bundle and an MLflow model
without the base's weights that generate as the trained module does; a fast_dev_run of the real CLI leaves an
existing bundle alone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pandas as pd
import torch
import yaml

from moa.pipelines.data.text import TextData
from moa.pipelines.kinds.causal_lm.module import MoACausalLM
from moa.pipelines.tracking.log_bundle import LogBundle

ROWS = [("say cat", "cat", "echo"), ("say dog", "dog", "echo"), ("say cat", "tac", "rev"), ("say dog", "god", "rev")]


def write_rows(path: Path) -> str:
    path.write_text("".join(json.dumps({"text": p, "label": t, "task": k}) + "\n" for p, t, k in ROWS))
    return str(path)


def files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}


def test_a_smollm2_fit_ships_no_base_weights_and_its_mlflow_model_generates_as_the_module(smollm2_dir, tmp_path,
                                                                                          monkeypatch):
    import mlflow

    from moa.pipelines.tracking.logger import MLflowLogger

    monkeypatch.chdir(tmp_path)  # the store's artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train = write_rows(tmp_path / "train.jsonl")
    data = TextData(train=train, val=train, task_column="task", target="text", tokenizer="smollm2-135m",
                    batch_size=4, max_length=16, target_max_length=4, prompt_template="{task}: {text} ->")
    top = "model.layers.29.self_attn"  # the top layer only: a step of the full model takes seconds on a CPU
    module = MoACausalLM(backbone="smollm2-135m", router="static", n_experts=2, r=4, top_k=1,
                         router_options={"key": "task_ids"}, target_modules=[f"{top}.q_proj", f"{top}.v_proj"],
                         lr=1e-2, max_new_tokens=3)
    shipped = LogBundle(directory=str(tmp_path / "bundle"))
    trainer = L.Trainer(max_epochs=1, limit_val_batches=1, logger=MLflowLogger(experiment_name="smollm2",
                                                                               tracking_uri=uri),
                        callbacks=[shipped], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, data)
        module.eval()
        batch = next(iter(data.val_dataloader()))
        tasks = batch["task_ids"].tolist()
        pick = [tasks.index(t) for t in sorted(set(tasks))]  # one row of each task (a prefill takes a second)
        batch = {k: v[pick] if torch.is_tensor(v) else [v[i] for i in pick] for k, v in batch.items()}
        expected = module.generate_texts(batch)  # the trained module's own greedy generations
        model = mlflow.pyfunc.load_model(shipped.model_uri)
        frame = data.rows("val").loc[batch["row"].tolist()]  # the rows, as a request
        answer = model.predict(pd.DataFrame({"prompt": list(frame["text"]), "task": list(frame["task"])}))
    finally:
        torch.set_num_threads(threads)
    assert list(answer["text"]) == expected and len(expected) == 2 and all(expected)

    base_bytes = (smollm2_dir / "model.safetensors").stat().st_size  # 538 MB of fp32 weights
    bundle = files(tmp_path / "bundle")
    assert json.loads((tmp_path / "bundle" / "service.json").read_text())["base_reference"] == "smollm2-135m"
    assert not any(name.startswith("base/") for name in bundle) and sum(bundle.values()) < base_bytes / 50
    stored = files(tmp_path / "mlruns")  # every artifact of the run: the logged model holds the bundle only
    assert "service.json" in {Path(name).name for name in stored}
    assert sum(stored.values()) < base_bytes / 50, sorted(stored.items(), key=lambda kv: -kv[1])[:3]



def test_fast_dev_run_leaves_the_bundle_folder_alone_and_says_so(tmp_path, monkeypatch):
    from moa.pipelines.cli.command import main

    monkeypatch.chdir(tmp_path)
    train = write_rows(tmp_path / "train.jsonl")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "service.json").write_text('{"kind": "causal-lm"}')  # the real bundle of an earlier fit
    config = {
        "model": {"class_path": "moa.pipelines.kinds.causal_lm.module.MoACausalLM",
                  "init_args": {"backbone": "tiny-llama", "router": "static", "n_experts": 2, "r": 2, "top_k": 1,
                                "router_options": {"key": "task_ids"}}},
        "data": {"class_path": "moa.pipelines.data.text.TextData",
                 "init_args": {"train": train, "val": train, "task_column": "task", "target": "text",
                               "batch_size": 4, "max_length": 16, "target_max_length": 4}},
        "trainer": {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "moa.pipelines.tracking.log_bundle.LogBundle",
                                   "init_args": {"directory": str(bundle)}}]},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    said = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    # Lightning's info lines go to lightning.pytorch's or lightning.fabric's rank_zero logger (whichever was imported
    # last); both propagate to "lightning". Other test modules raise these loggers' levels at import.
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    lightning_log = loggers[0]
    lightning_log.addHandler(handler)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["fit", "-c", str(tmp_path / "fit.yaml"), "--trainer.fast_dev_run", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
        lightning_log.removeHandler(handler)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    assert files(bundle) == {"service.json": len('{"kind": "causal-lm"}')}  # untouched
    assert [line for line in said if "LogBundle" in line] == [
        f"LogBundle: fast_dev_run, so no bundle is written ({bundle} is left as it was)"]
