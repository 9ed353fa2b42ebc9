"""A text classifier the way a user runs it: ``moa fit`` (subprocess) with ``LogBundle`` registers it in a real
MLflow store on disk, ``moa batch`` scores a CSV file, and moa's server answers requests in names over real HTTP;
the expected answers are computed here from the bundle's files with moa's core API, not with the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from moa.pipelines.serving.client import post
from moa.pipelines.serving.process import ModelServer

MOA = str(Path(sys.executable).with_name("moa"))
WORDS = {"good": ("polarity", "pos"), "bad": ("polarity", "neg"), "cats": ("topic", "animals"),
         "cars": ("topic", "vehicles"), "songs": ("topic", "music")}
pytestmark = pytest.mark.slow


def config(root: Path, train: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "model": {"class_path": "moa.pipelines.kinds.classifier.module.MoAClassifier",
                  "init_args": {"backbone": "minilm", "router": "static", "n_experts": 2, "r": 4, "top_k": 1,
                                "router_options": {"key": "task_ids"}, "target_modules": ["query", "value"],
                                "lr": 0.005}},
        "data": {"class_path": "moa.pipelines.data.text.TextData",
                 "init_args": {"train": str(train), "val": str(train), "task_column": "task", "batch_size": 10,
                               "max_length": 16}},
        "trainer": {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "enable_checkpointing": False, "default_root_dir": str(root / "runs"),
                    "logger": {"class_path": "moa.pipelines.tracking.logger.MLflowLogger",
                               "init_args": {"experiment_name": "text"}},
                    "callbacks": [{"class_path": "moa.pipelines.tracking.log_bundle.LogBundle",
                                   "init_args": {"directory": str(root / "bundle"), "register_as": "clf",
                                                 "base": "include"}}]},  # expected_answers reads base/
    }
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    rows = [{"text": f"item {i % 7} is about {w}", "label": WORDS[w][1], "task": WORDS[w][0]}
            for i in range(60) for w in [list(WORDS)[i % 5]]]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([MOA, "fit", "-c", str(config(root, train))], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"root": root, "env": env, "bundle": root / "bundle"}


def expected_answers(bundle: Path, texts, tasks):
    """The bundle's classifier rebuilt from its files with moa's core API: adapters on the shipped base, the head."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    import moa
    from moa.pipelines.kinds.classifier.module import TaskLabelHead

    meta = json.loads((bundle / "service.json").read_text())
    model = moa.load(bundle / "adapter", AutoModel.from_pretrained(str(bundle / "base"))).eval()
    head = TaskLabelHead(meta["head"]["hidden_size"], meta["head"]["label_counts"], meta["head"]["pooling"]).eval()
    head.load_state_dict(load_file(str(bundle / "head.safetensors")))
    tokenizer = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    task_ids = torch.tensor([meta["tasks"].index(t) for t in tasks])
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded, task_ids=task_ids).last_hidden_state
        probs = head(hidden, encoded["attention_mask"], task_ids).softmax(-1)
    out = []
    for task, p in zip(tasks, probs):
        labels = meta["labels"][task]
        p = p[: len(labels)]
        out.append((labels[int(p.argmax())], p.tolist()))
    return out


def test_fit_registers_the_classifier_with_its_kinds_gate(fitted):
    from mlflow import MlflowClient

    store = fitted["env"]["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    champion = client.get_model_version_by_alias("clf", "champion")
    assert (champion.tags["gate_metric"], champion.tags["gate_mode"]) == ("val/accuracy", "max")
    run = client.get_run(champion.run_id)  # the model was logged into the fit's own run
    assert run.data.metrics["val/accuracy"] == pytest.approx(float(champion.tags["gate_value"]), abs=1e-5)
    assert run.info.run_name.startswith("static")


def test_moa_batch_scores_a_csv_file_of_named_rows(fitted, capsys):
    """A test file as a user has it: its ``label`` and a ``domain`` the model was trained without are ignored,
    named in one stderr line and copied to the output (the answer's ``label`` is written ``predicted_label``)."""
    root = fitted["root"]
    texts = ["item 3 is about cats", "item 1 is about good", "item 2 is about songs"]
    tasks = ["topic", "polarity", "topic"]
    pd.DataFrame({"id": ["a", "b", "c"], "text": texts, "task": tasks, "domain": ["books", "films", "books"],
                  "label": ["animals", "pos", "music"]}).to_csv(root / "rows.csv", index=False)
    done = subprocess.run([MOA, "batch", "--model-uri", "models:/clf@champion", "--input", str(root / "rows.csv"),
                           "--out", str(root / "answers.parquet"), "--batch-size", "2"], cwd=root, env=fitted["env"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scoring" in done.stderr and "3/3" in done.stderr  # the progress bar
    assert done.stderr.count("ignored the columns ['id', 'domain', 'label']: the model does not read them") == 1
    answers = pd.read_parquet(root / "answers.parquet")
    assert list(answers["id"]) == ["a", "b", "c"]  # the user's columns are kept, in order
    assert list(answers["domain"]) == ["books", "films", "books"] and list(answers["label"])[1] == "pos"
    for (label, probs), got_label, got_probs in zip(expected_answers(fitted["bundle"], texts, tasks),
                                                    answers["predicted_label"], answers["probabilities"]):
        assert got_label == label and list(got_probs) == pytest.approx(probs, abs=1e-5)

    # user errors as one line, in process (the command's own entry point; the subprocess above is the real CLI)
    from moa.pipelines.cli.command import main

    store = fitted["env"]["MLFLOW_TRACKING_URI"]
    assert main(["batch", "--model-uri", "models:/clf@champion", "--input", str(root / "nope.csv"),
                 "--tracking-uri", store]) == 2
    assert "nope.csv" in capsys.readouterr().err
    # a bad row is named in the request's row numbers (here in the second model call) and nothing is written
    pd.DataFrame({"text": texts, "task": ["topic", "topic", "genre"]}).to_csv(root / "bad.csv", index=False)
    assert main(["batch", "--model-uri", "models:/clf@champion", "--input", str(root / "bad.csv"), "--out",
                 str(root / "bad.parquet"), "--batch-size", "2", "--tracking-uri", store]) == 2
    error = capsys.readouterr().err
    assert "row 2: unknown task 'genre'" in error and "Traceback" not in error
    assert not (root / "bad.parquet").exists()


def test_server_answers_named_rows_and_names_a_bad_task(fitted):
    """Rows with a ``domain`` (the model was trained without domains) and a ``label`` are answered as without
    them, and the answer names them in ``ignored_columns``; a row with an unknown task is still refused."""
    texts, tasks = ["item 4 is about cars", "item 6 is about bad"], ["topic", "polarity"]
    expected = expected_answers(fitted["bundle"], texts, tasks)
    with ModelServer("models:/clf@champion", tracking_uri=fitted["env"]["MLFLOW_TRACKING_URI"],
                     log_path=fitted["root"] / "server.log") as server:
        rows = [{"text": x, "task": t, "domain": "books", "label": "pos"} for x, t in zip(texts, tasks)]
        status, body = post(f"{server.url}/invocations", {"dataframe_records": rows})
        assert status == 200 and body["ignored_columns"] == ["domain", "label"], body
        for (label, probs), answer in zip(expected, body["predictions"]):
            assert answer["label"] == label and answer["probabilities"] == pytest.approx(probs, abs=1e-5)
        status, body = post(f"{server.url}/invocations", {"dataframe_records": [{"text": "x", "task": "genre"}]})
        assert status == 400 and "unknown task 'genre'" in body["message"] and "Traceback" not in json.dumps(body)


def test_a_causal_lm_without_domains_ignores_and_names_a_domain_column_every_way_in(fitted, tmp_path, capsys, caplog):
    """A causal LM trained without domains (tiny random Llama, two tasks): a ``domain`` and a ``split`` column
    change no generation; the pyfunc model logs the domain in one warning (MLflow the other), ``moa batch`` names
    them in one stderr line, the server in ``ignored_columns``. Expected texts: the same model with the rows without those columns."""
    import logging

    from moa.pipelines.cli.command import main
    from moa.pipelines.kinds.causal_lm.module import MoACausalLM
    from moa.pipelines.kinds.text_bundle import write_text_bundle
    from moa.pipelines.serving.server import create_app, load, serve_in_thread
    from moa.pipelines.tracking.registry import register_bundle

    torch.set_num_threads(1)
    module = MoACausalLM(backbone="tiny-llama", router="static", n_experts=2, r=4, top_k=1,
                         router_options={"key": "task_ids"}, seed=0).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: random adapters make each task's routing matter
        for parameter in (p for p in module.model.parameters() if p.requires_grad):
            parameter.normal_(0, 0.3)
    module.task_names = ["echo", "rev"]
    uri = fitted["env"]["MLFLOW_TRACKING_URI"]  # the module's store (a new sqlite store takes seconds to create)
    register_bundle(write_text_bundle(tmp_path / "bundle", module, metrics={"val/loss": 1.0}), "lm", tracking_uri=uri)
    plain = pd.DataFrame({"prompt": ["say cat", "one two three"], "task": ["echo", "rev"],
                          "max_new_tokens": [4.0, 4.0]})
    extra = plain.assign(domain=["books", "films"], split="test")
    model = load("models:/lm@champion", uri)
    caplog.set_level(logging.WARNING)
    caplog.clear()  # (registering validates the input example, whose domain is the placeholder: named too)
    expected = list(model.predict(plain)["text"])
    assert not [r for r in caplog.records if r.name == "moa.pyfunc"]
    assert list(model.predict(extra)["text"]) == expected and len(set(expected)) == 2
    named = [r.getMessage() for r in caplog.records if r.name == "moa.pyfunc"]
    assert named == ["ignored the columns ['domain']: the model does not read them"]  # MLflow names 'split' itself

    extra.to_csv(tmp_path / "rows.csv", index=False)
    assert main(["batch", "--model-uri", "models:/lm@champion", "--input", str(tmp_path / "rows.csv"), "--out",
                 str(tmp_path / "out.jsonl"), "--tracking-uri", uri]) == 0
    assert capsys.readouterr().err.count("ignored the columns ['domain', 'split']") == 1
    assert list(pd.read_json(tmp_path / "out.jsonl", lines=True)["text"]) == expected

    with serve_in_thread(create_app(model)) as url:
        status, body = post(f"{url}/invocations", {"dataframe_split": json.loads(extra.to_json(orient="split",
                                                                                            index=False))})
    assert status == 200 and body["ignored_columns"] == ["domain", "split"], body
    assert [p["text"] for p in body["predictions"]] == expected
