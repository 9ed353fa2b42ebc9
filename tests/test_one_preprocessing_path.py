"""One pre-processing path for training and serving: a row served from a text bundle reaches the model as the same
tensors as the same row in a validation batch of the data module the model was trained with.

Both sides are captured at the model call (the classifier's forward, the causal LM's ``generate``): the trained
module under ``Trainer.validate`` on :class:`~moa.pipelines.data.text.TextData` batches, the bundle's service on
a request of the same rows. Rows of different lengths share a batch (padding matters), one is longer than
``max_length`` (truncation matters), tasks and domains are mixed and the template uses every field.
"""

from __future__ import annotations

import json

import lightning as L
import pandas as pd
import torch

from transformers import AutoTokenizer

from moa.pipelines.bundle import load_service
from moa.pretrained import minilm_dir
from moa.pipelines.kinds.causal_lm.module import MoACausalLM
from moa.pipelines.kinds.classifier.module import MoAClassifier
from moa.pipelines.data.text import TextData

WORDS = ["cats", "purr", "cars", "drive", "songs", "play", "rain", "falls"]
KEYS = ("input_ids", "attention_mask", "task_ids", "domain_ids")
MAX_LENGTH = 24


def records():
    """12 rows of 1 to 12 words and one of 40 (over MAX_LENGTH tokens), two tasks, two domains."""
    out = []
    for i in range(12):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40 if i == 7 else 1 + i))
        out.append({"text": f"{i} {words}", "task": "ab"[i % 2], "domain": "xy"[(i // 2) % 2],
                    "label": ("pos", "neg", "mid")[i % 3], "answer": f"{WORDS[i % len(WORDS)]} {i}"})
    return out


def make_data(tmp_path, **options):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    return TextData(train=str(path), val=str(path), task_column="task", domain_column="domain", batch_size=4,
                    max_length=MAX_LENGTH, prompt_template="{task} / {domain}: {text} =>", **options)


class Rows(L.Callback):
    """The ``row`` of every validation batch, in order."""

    def __init__(self):
        self.rows = []

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.rows.append(batch["row"].tolist())


def capture_forward(model, calls):
    return model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: kwargs[k].clone() for k in KEYS}), with_kwargs=True)


def capture_generate(model, calls):
    """Wrap ``model.generate`` to record its inputs and options, and put an eos second in every other row's new
    tokens (a tiny random model rarely draws it), so that both sides must cut there."""
    generate = model.generate

    def recording(**kwargs):
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        out = generate(**kwargs).clone()
        out[::2, kwargs["input_ids"].shape[1] + 1] = kwargs["eos_token_id"]
        return out

    model.generate = recording


def validate(module, data, tmp_path):
    """The validation batches' rows, the bundle's service."""
    torch.set_num_threads(1)
    rows = Rows()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[rows])
    trainer.validate(module, data)
    return rows.rows, load_service(module.write_bundle(tmp_path / "bundle", data))


def request(data, rows, text_column):
    frame = data.rows("val").iloc[rows]
    return pd.DataFrame({text_column: list(frame["text"]), "task": list(frame["task"]),
                         "domain": list(frame["domain"])})


def assert_same(served, trained, keys):
    for key in keys:
        assert served[key].tolist() == trained[key].tolist(), key


def test_a_served_classifier_row_reaches_the_model_as_in_its_validation_batch(tmp_path):
    data = make_data(tmp_path)
    module = MoAClassifier(backbone="tiny-bert", backbone_options={"vocab_size": 30522}, n_experts=2, r=4)
    trained, served = [], []
    capture_forward(module.model, trained)
    batches, service = validate(module, data, tmp_path)
    capture_forward(service.model, served)
    lengths = {int(m.sum()) for call in trained for m in call["attention_mask"]}
    assert len(batches) == 3 and len(lengths) > 3 and max(lengths) == MAX_LENGTH  # padded and truncated rows
    for rows, expected in zip(batches, trained):
        service.predict(request(data, rows, "text"))
        assert_same(served[-1], expected, KEYS)


def test_a_served_prompt_is_generated_from_as_in_its_validation_batch(tmp_path):
    data = make_data(tmp_path, target="text", target_column="answer", target_max_length=3)
    module = MoACausalLM(backbone="tiny-llama", n_experts=2, r=4, router="static", top_k=1,
                         router_options={"key": "task_ids"})
    trained, served = [], []
    capture_generate(module.model, trained)
    batches, service = validate(module, data, tmp_path)
    capture_generate(service.model, served)
    lengths = {int(m.sum()) for call in trained for m in call["attention_mask"]}
    assert len(trained) == len(batches) == 3 and len(lengths) > 3 and max(lengths) == MAX_LENGTH
    module.eval()
    long_row = 7  # over MAX_LENGTH: training cuts it (and says so); a server generates from it whole
    for rows, expected in zip(batches, trained):
        if long_row in rows:
            whole = service.predict(request(data, [long_row], "prompt"))
            prompt = data.rows("val").iloc[long_row]
            text = data.prompt_template.format(text=prompt["text"], task=prompt["task"], domain=prompt["domain"])
            expected_ids = AutoTokenizer.from_pretrained(str(minilm_dir()))(text, add_special_tokens=False)["input_ids"]
            assert served[-1]["input_ids"][0].tolist() == expected_ids and len(expected_ids) > MAX_LENGTH
            assert len(whole["text"]) == 1
            continue
        answer = service.predict(request(data, rows, "prompt"))
        assert_same(served[-1], expected, KEYS)
        for option in ("max_new_tokens", "eos_token_id", "pad_token_id"):
            assert served[-1][option] == expected[option], option
        # the same decoding of the same tokens: the module's texts for the batch
        batch = {"prompt_input_ids": expected["input_ids"], "prompt_attention_mask": expected["attention_mask"],
                 "task_ids": expected["task_ids"], "domain_ids": expected["domain_ids"]}
        texts = module.generate_texts(batch)
        assert list(answer["text"]) == texts and all(len(t.split()) <= 1 for t in texts[::2])
