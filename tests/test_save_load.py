"""PEFT's saving habits: ``moa.load(folder)`` finds the base model recorded at save time, and ``modules_to_save``
trains base modules in full and saves them with the adapters."""

from __future__ import annotations

import json

import pytest
import torch

import moa
from moa.pretrained import minilm_dir


def tokens(n: int = 2, length: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1, 1000, (n, length), generator=g), "attention_mask": torch.ones(n, length, dtype=torch.long)}


def perturb(model: moa.MoAModel) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def test_load_finds_the_recorded_pretrained_base(tmp_path, one_thread):
    from transformers import AutoModel

    model = moa.attach(AutoModel.from_pretrained(str(minilm_dir())), moa.MoAConfig(n_experts=2, r=4, top_k=1))
    perturb(model)
    model.eval()
    want = model(**tokens(), expert_ids=torch.tensor([0, 1])).last_hidden_state
    model.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "moa_config.json").read_text())
    assert meta["base_model_class"] == "BertModel" and meta["base_model_name_or_path"] == str(minilm_dir())

    loaded = moa.load(tmp_path / "saved")  # no base argument
    assert type(loaded.model).__name__ == "BertModel"
    got = loaded(**tokens(), expert_ids=torch.tensor([0, 1])).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    again = moa.load(tmp_path / "saved", AutoModel.from_pretrained(str(minilm_dir())))  # explicit base still works
    torch.testing.assert_close(again.eval()(**tokens(), expert_ids=torch.tensor([0, 1])).last_hidden_state, want)


def test_load_without_a_recorded_base_says_what_to_pass(tmp_path):
    from transformers import BertConfig, BertModel

    base = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    moa.attach(base, moa.MoAConfig(n_experts=2, r=2, top_k=1)).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"records no base model path.*moa.load\(folder, base_model\)"):
        moa.load(tmp_path / "a")
    moa.attach(BertModel(base.config), moa.MoAConfig(n_experts=2, r=2, top_k=1)).save_pretrained(
        tmp_path / "b", base_model_name_or_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="cannot load the base model .*nowhere"):
        moa.load(tmp_path / "b")


def tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))


def test_modules_to_save_train_in_full_and_round_trip(tmp_path):
    config = moa.MoAConfig(n_experts=2, r=2, top_k=1, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = moa.attach(tiny_classifier(), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.classifier.weight", "model.classifier.bias"} <= trainable
    assert not any("pooler" in n or "embeddings" in n for n in trainable)
    perturb(model)
    model.eval()
    ids = torch.randint(1, 50, (2, 5))
    want = model(input_ids=ids, expert_ids=torch.tensor([1, 0])).logits
    model.save_pretrained(tmp_path)
    fresh = tiny_classifier()
    assert not torch.equal(fresh.classifier.weight, model.model.classifier.weight)
    loaded = moa.load(tmp_path, fresh).eval()
    torch.testing.assert_close(loaded(input_ids=ids, expert_ids=torch.tensor([1, 0])).logits, want, rtol=0, atol=0)
    assert loaded.model.classifier.weight.requires_grad


def test_modules_to_save_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="no module matches modules_to_save"):
        moa.attach(tiny_classifier(), moa.MoAConfig(n_experts=2, r=2, top_k=1, modules_to_save=["nothing_here"]))
    model = tiny_classifier()
    with pytest.raises(ValueError, match="both adapted"):
        moa.attach(model, moa.MoAConfig(n_experts=2, r=2, top_k=1, target_modules=["query"], modules_to_save=["attention"]))
    assert not any(isinstance(m, moa.MoALinear) for m in model.modules())  # all or nothing
    assert all(p.requires_grad for p in model.parameters())
