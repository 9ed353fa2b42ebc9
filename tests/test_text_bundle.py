"""Text model kinds as serving bundles: a MiniLM classifier and a tiny Llama, trained with Lightning on files, written
as bundles, answered by their services in names, and checked against the trained modules' own predictions."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from moa.pipelines.bundle import RequestError, load_service
from moa.pipelines.kinds.causal_lm.module import MoACausalLM
from moa.pipelines.kinds.classifier.module import MoAClassifier
from moa.pipelines.kinds.causal_lm.service import RowSampling
from moa.pipelines.data.text import TextData

WORDS = {"good": ("polarity", "pos"), "bad": ("polarity", "neg"), "cats": ("topic", "animals"),
         "cars": ("topic", "vehicles"), "songs": ("topic", "music")}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def fit(module, data, root, epochs):
    torch.set_num_threads(1)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root, num_sanity_val_steps=0)
    trainer.fit(module, data)
    return trainer


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """MiniLM (from_pretrained) with Poly routing over two tasks, two epochs, and its bundle."""
    root = tmp_path_factory.mktemp("classifier")
    rows = [{"text": f"item {i % 7} is about {w}", "label": WORDS[w][1], "task": WORDS[w][0]}
            for i in range(60) for w in [list(WORDS)[i % 5]]]
    train = write_jsonl(root / "train.jsonl", rows)
    data = TextData(train=train, val=train, test=train, task_column="task", batch_size=10, max_length=16)
    module = MoAClassifier(backbone="minilm", router="poly", n_experts=3, r=4, target_modules=["query", "value"],
                           router_options={"n_tasks": 2},
                           lr=5e-3)
    trainer = fit(module, data, root, epochs=2)
    module.eval()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    bundle = module.write_bundle(root / "bundle", data, metrics=metrics)
    return {"module": module, "data": data, "bundle": bundle, "root": root, "metrics": metrics}


def module_probabilities(module, data, texts, tasks):
    """The trained module's own softmax over each row's task labels, through the data module's encoding."""
    task_ids = {t: i for i, t in enumerate(data.task_names)}
    encoded = data.tokenizer(texts, truncation=True, max_length=data.max_length, padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
             "task_ids": torch.tensor([task_ids[t] for t in tasks]), "domain_ids": torch.zeros(len(texts), dtype=torch.long)}
    with torch.no_grad():
        probs = module(batch).float().softmax(-1)
    return [p[: len(data.label_names[t])].tolist() for p, t in zip(probs, tasks)]


def test_classifier_bundle_answers_in_names_like_the_trained_module(classifier):
    service = load_service(classifier["bundle"])
    texts = ["item 3 is about cats", "item 1 is about good", "item 5 is about cars", "item 2 is about bad"]
    tasks = ["topic", "polarity", "topic", "polarity"]
    answer = service.predict(pd.DataFrame({"text": texts, "task": tasks}))
    expected = module_probabilities(classifier["module"], classifier["data"], texts, tasks)
    for row, (task, probs) in enumerate(zip(tasks, expected)):
        labels = classifier["data"].label_names[task]
        assert answer.loc[row, "labels"] == labels
        assert answer.loc[row, "probabilities"] == pytest.approx(probs, abs=1e-5)
        assert answer.loc[row, "label"] == labels[max(range(len(probs)), key=probs.__getitem__)]
        assert answer.loc[row, "probability"] == pytest.approx(max(probs), abs=1e-5)
    assert list(answer["label"]) == ["animals", "pos", "vehicles", "neg"]  # it learned the tasks


def test_a_mixed_task_request_equals_each_task_alone(classifier):
    service = load_service(classifier["bundle"])
    frame = pd.DataFrame({"text": ["item 3 is about cats", "item 1 is about good", "item 4 is about songs",
                                   "item 6 is about bad"], "task": ["topic", "polarity", "topic", "polarity"]})
    mixed = service.predict(frame)
    for row, (text, task) in enumerate(zip(frame["text"], frame["task"])):
        # alone: the trained module on that row only (its own batch, no padding, no other task beside it)
        alone = module_probabilities(classifier["module"], classifier["data"], [text], [task])[0]
        labels = classifier["data"].label_names[task]
        assert mixed.loc[row, "probabilities"] == pytest.approx(alone, abs=1e-5)
        assert mixed.loc[row, "label"] == labels[max(range(len(alone)), key=alone.__getitem__)]


def test_the_base_is_referenced_by_default_included_on_request_and_checked_at_load(classifier, tmp_path):
    import hashlib

    import moa
    from moa.pretrained import minilm_dir

    bundle = classifier["bundle"]  # written with the default: the base referenced, not copied
    meta = json.loads((bundle / "service.json").read_text())
    assert meta["kind"] == "classifier" and meta["tasks"] == ["polarity", "topic"]
    assert meta["labels"] == {"polarity": ["neg", "pos"], "topic": ["animals", "music", "vehicles"]}
    assert meta["metrics"] == pytest.approx(classifier["metrics"]) and "val/accuracy" in meta["metrics"]
    assert meta["moa_version"] == moa.__version__
    assert meta["base_reference"] == "minilm" and not (bundle / "base").exists()
    assert meta["base_sha256"] == hashlib.sha256((minilm_dir() / "config.json").read_bytes()).hexdigest()
    base_bytes = (minilm_dir() / "model.safetensors").stat().st_size

    def size(folder):
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    assert size(bundle) < base_bytes / 10  # adapters, head and tokenizer only
    prefixes = [str(Path(p).resolve()) for p in (classifier["root"], Path(moa.__file__).parents[1], "/tmp", "/work")]
    module, data = classifier["module"], classifier["data"]
    included = module.write_bundle(tmp_path / "written", data, base="include")  # as every bundle was before
    assert (included / "base" / "config.json").is_file() and size(included) > base_bytes
    for folder in (bundle, included):  # a named or shipped base: no absolute path anywhere
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".txt", ".yaml"):
                text = path.read_text()
                assert not [p for p in prefixes if p in text], f"{path.relative_to(folder)} holds an absolute path"
    # a bundle with its base moved away from where it was written (its old folder gone) answers as the module does
    (tmp_path / "elsewhere").mkdir()
    moved = Path(shutil.move(str(included), str(tmp_path / "elsewhere" / "moved")))
    assert not included.exists()
    texts = ["item 3 is about cats", "item 1 is about good", "item 4 is about songs", "item 6 is about bad"]
    tasks = ["topic", "polarity", "topic", "polarity"]
    expected = module_probabilities(module, data, texts, tasks)

    def answers(folder):
        answer = load_service(folder).predict(pd.DataFrame({"text": texts, "task": tasks}))
        return [list(p) for p in answer["probabilities"]]

    for folder in (moved, bundle):
        for row, probs in enumerate(answers(folder)):
            assert probs == pytest.approx(expected[row], abs=1e-5), (folder.name, row)

    # a model folder by absolute path: recorded with its config's sha256; another model there, or none, is named
    folder = tmp_path / "my-minilm"
    folder.mkdir()
    shutil.copy(minilm_dir() / "config.json", folder / "config.json")
    (folder / "model.safetensors").symlink_to(minilm_dir() / "model.safetensors")
    saved = module.backbone
    try:
        module.backbone = str(folder)
        at_path = module.write_bundle(tmp_path / "at-path", data)
    finally:
        module.backbone = saved
    assert json.loads((at_path / "service.json").read_text())["base_reference"] == str(folder)
    assert not (at_path / "base").exists()
    for row, probs in enumerate(answers(at_path)):
        assert probs == pytest.approx(expected[row], abs=1e-5), row
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))  # another model now
    with pytest.raises(ValueError, match=f"base '{folder}' is not the model it was written with: config.json"):
        load_service(at_path)
    shutil.rmtree(folder)
    with pytest.raises(ValueError, match=f"base model '{folder}' is not on this machine") as error:
        load_service(at_path)
    assert "\n" not in str(error.value) and "base: include" in str(error.value)


@pytest.mark.parametrize("rows, params, message", [
    ([{"text": "item 1 is about cats", "task": "genre"}], None, r"row 0: unknown task 'genre'; this model knows \['polarity', 'topic'\]"),
    ([{"text": "item 1 is about cats"}], None, "missing input column 'task'"),
    ([{"task": "topic"}], None, "missing input column 'text'"),
    ([{"text": "ok", "task": "topic"}, {"text": "  ", "task": "topic"}], None, "row 1: text must be a non-empty string"),
    ([{"text": "ok", "task": "topic"}], {"k": 3}, r"unknown params \['k'\]"),
])
def test_classifier_refuses_bad_rows_naming_the_problem(classifier, rows, params, message):
    with pytest.raises(RequestError, match=message):
        load_service(classifier["bundle"]).predict(pd.DataFrame(rows), params)


def test_a_corrupted_bundle_file_is_named_at_load(classifier, tmp_path):
    copy = Path(shutil.copytree(classifier["bundle"], tmp_path / "copy"))
    head = copy / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="head.safetensors"):
        load_service(copy)


# ---------------------------------------------------------------------------------------------------- causal LM
ECHO = [("say cat", "cat", "echo"), ("say dog", "dog", "echo"), ("say sun", "sun", "echo"),
        ("say cat", "tac", "rev"), ("say dog", "god", "rev"), ("say sun", "nus", "rev")]


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    train = write_jsonl(root / "train.jsonl", [{"text": p, "label": t, "task": k} for p, t, k in ECHO * 4])
    data = TextData(train=train, val=train, task_column="task", target="text", batch_size=8, max_length=16,
                    target_max_length=4, prompt_template="{task}: {text} ->")
    module = MoACausalLM(backbone="tiny-llama", router="static", n_experts=2, r=4, top_k=1,
                         router_options={"key": "task_ids"}, lr=1e-2)
    fit(module, data, root, epochs=2)
    module.eval()
    bundle = module.write_bundle(root / "bundle", data, metrics={"val/loss": 1.0})
    with torch.no_grad():  # the module's own greedy generations for the rows, through the data module's batches
        data.setup("predict")
        expected = {}
        for batch in data.val_dataloader():
            texts = module.generate_texts(batch)
            for row, text in zip(batch["row"].tolist(), texts):
                expected[row] = text
    frame = data.rows("val")
    return {"module": module, "data": data, "bundle": bundle,
            "expected": [(frame.loc[r, "text"], frame.loc[r, "task"], expected[r]) for r in sorted(expected)]}


def test_causal_bundle_generates_like_the_module_with_tasks_mixed_in_one_batch(causal):
    service = load_service(causal["bundle"])
    prompts, tasks, expected = zip(*causal["expected"])
    answer = service.predict(pd.DataFrame({"prompt": prompts, "task": tasks}))
    assert list(answer["text"]) == list(expected)
    for task in ("echo", "rev"):  # each task alone gives the same texts
        rows = [i for i, t in enumerate(tasks) if t == task]
        alone = service.predict(pd.DataFrame({"prompt": [prompts[i] for i in rows], "task": [task] * len(rows)}))
        assert list(alone["text"]) == [expected[i] for i in rows]


def test_generation_settings_are_per_row(causal):
    service = load_service(causal["bundle"])
    tokenizer = service.tokenizer
    long = service.predict(pd.DataFrame({"prompt": ["say cat"] * 2, "task": ["echo", "rev"]}), {"max_new_tokens": 6})
    mixed = service.predict(pd.DataFrame({"prompt": ["say cat"] * 2, "task": ["echo", "rev"],
                                          "max_new_tokens": [1.0, math.nan]}), {"max_new_tokens": 6})
    assert mixed.loc[1, "text"] == long.loc[1, "text"]  # the param is the default of rows without their own
    one_token = mixed.loc[0, "text"]  # the row's own budget: the first token of its longer generation
    assert len(tokenizer(one_token, add_special_tokens=False)["input_ids"]) == 1
    assert long.loc[0, "text"].startswith(one_token) and len(long.loc[0, "text"]) > len(one_token)

    sampled = pd.DataFrame({"prompt": ["say dog"] * 3, "task": ["echo", "rev", "rev"],
                            "temperature": [0.0, 2.0, 2.0], "top_p": [1.0, 0.9, 1.0]})
    one, two = service.predict(sampled, {"seed": 7}), service.predict(sampled, {"seed": 7})
    assert list(one["text"]) == list(two["text"])  # a seed makes sampling reproducible
    greedy = {(prompt, task): text for prompt, task, text in causal["expected"]}[("say dog", "echo")]
    assert one.loc[0, "text"] == greedy  # temperature 0 inside a sampling batch stays the module's greedy text


@pytest.mark.parametrize("column, value, message", [
    ("max_new_tokens", 0, r"max_new_tokens must be an integer in \[1, \d+\].*got 0"),
    ("max_new_tokens", 2.5, "max_new_tokens must be an integer"),
    ("temperature", -1.0, "temperature must be a number in"),
    ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
])
def test_bad_generation_settings_are_refused(causal, column, value, message):
    with pytest.raises(RequestError, match=f"row 0: {message}"):
        load_service(causal["bundle"]).predict(pd.DataFrame({"prompt": ["say cat"], "task": ["echo"], column: [value]}))


def test_row_sampling_scales_and_cuts_each_row_by_hand():
    """Row 0 greedy; row 1 temperature 2 and top_p 0.6 over probabilities (from logits / 2) 0.5, 0.3, 0.2 keeps
    the first two (0.5 < 0.6 <= 0.8); row 2 top_p 1 keeps all."""
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])) * 2
    out = RowSampling(torch.tensor([0.0, 2.0, 2.0]), torch.tensor([1.0, 0.6, 1.0]))(None, logits)
    assert torch.isinf(out[0, [0, 2]]).all() and torch.isfinite(out[0, 1])
    assert torch.allclose(out[1, :2].softmax(-1), torch.tensor([0.5, 0.3]) / 0.8) and torch.isinf(out[1, 2])
    assert torch.allclose(out[2].softmax(-1), torch.tensor([0.2, 0.2, 0.6]))


def test_causal_bundle_registers_with_a_loss_gate_and_generates_through_mlflow(causal, tmp_path, monkeypatch):
    import mlflow

    from moa.pipelines.tracking.registry import register_bundle

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    promotion = register_bundle(causal["bundle"], "lm")  # the kind's gate: val/loss, lower is better
    assert promotion.promoted and promotion.reason.startswith("first version with a metric: val/loss 1.0000")
    model = mlflow.pyfunc.load_model("models:/lm@champion")
    import moa

    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/lm@champion")).read_text().split()
    assert f"moa=={moa.__version__}" in requirements  # pins the moa that wrote it
    assert model.metadata.metadata["kind"] == "causal-lm" and model.metadata.metadata["tasks"] == ["echo", "rev"]
    prompts, tasks, expected = zip(*causal["expected"])
    answer = model.predict(pd.DataFrame({"prompt": prompts, "task": tasks}))
    assert list(answer["text"]) == list(expected)
    with pytest.raises(mlflow.exceptions.MlflowException, match="unknown task 'nope'") as error:
        model.predict(pd.DataFrame({"prompt": ["say cat"], "task": ["nope"]}))
    assert error.value.get_http_status_code() == 400


def test_causal_model_served_over_http_generates_per_row(causal, tmp_path):
    from moa.pipelines.tracking.registry import register_bundle
    from moa.pipelines.serving.client import post
    from moa.pipelines.serving.process import ModelServer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_bundle(causal["bundle"], "lm-http", tracking_uri=uri)
    prompts, tasks, expected = zip(*causal["expected"])
    rows = [{"prompt": p, "task": t} for p, t in zip(prompts, tasks)]
    with ModelServer("models:/lm-http@champion", tracking_uri=uri, log_path=tmp_path / "server.log") as server:
        status, body = post(f"{server.url}/invocations", {"dataframe_records": rows})
        assert status == 200, body
        assert [p["text"] for p in body["predictions"]] == list(expected)  # the module's own greedy generations
        sampled = {"dataframe_records": [{**rows[0], "temperature": 1.5, "top_p": 0.9}, {**rows[1], "max_new_tokens": 1}],
                   "params": {"seed": 3}}
        first, again = post(f"{server.url}/invocations", sampled), post(f"{server.url}/invocations", sampled)
        assert first[0] == 200 and first == again  # seeded sampling repeats
        status, body = post(f"{server.url}/invocations", {"dataframe_records": [{**rows[0], "top_p": 2}]})
        assert status == 400 and "row 0: top_p must be a number in (0, 1]" in body["message"]
        status, body = post(f"{server.url}/invocations", {"dataframe_records": rows[:1], "params": {"beams": 4}})
        assert status == 400 and "unknown params ['beams']" in body["message"]


def test_moa_batch_takes_whole_number_budgets_from_a_file_and_refuses_a_fraction(causal, tmp_path, monkeypatch,
                                                                                capsys):
    from moa.pipelines.cli.command import main
    from moa.pipelines.tracking.registry import register_bundle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    register_bundle(causal["bundle"], "lm-batch", tracking_uri=uri)
    rows = [{"prompt": "say cat", "task": "echo", "max_new_tokens": 1}, {"prompt": "say dog", "task": "rev", "max_new_tokens": 3}]
    write_jsonl(tmp_path / "rows.jsonl", rows)  # read back as an int64 column; the signature says double
    assert main(["batch", "--model-uri", "models:/lm-batch/1", "--input", str(tmp_path / "rows.jsonl"),
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    texts = list(pd.read_json(tmp_path / "out.jsonl", lines=True)["text"])
    service = load_service(causal["bundle"])
    assert texts == list(service.predict(pd.DataFrame(rows).astype({"max_new_tokens": float}))["text"])
    assert len(service.tokenizer(texts[0], add_special_tokens=False)["input_ids"]) == 1  # the row's own budget
    write_jsonl(tmp_path / "half.jsonl", [{**rows[0], "max_new_tokens": 2.5}])
    capsys.readouterr()
    assert main(["batch", "--model-uri", "models:/lm-batch/1", "--input", str(tmp_path / "half.jsonl"),
                 "--out", str(tmp_path / "half-out.jsonl")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("moa batch: error: row 0: max_new_tokens must be an integer in [1, ") and "got 2.5" in error
    assert not (tmp_path / "half-out.jsonl").exists()
