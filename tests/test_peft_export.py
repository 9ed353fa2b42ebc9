"""What a PEFT user expects of an exported adapter (issue 27): ``AutoPeftModel*`` load it without a base, the trained
classifier head comes with it (``modules_to_save``), one task of a Poly / MHR model exports as one LoRA; and
``moa.load(folder)`` rebuilds a classifier base with its own number of labels."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import AutoPeftModel, AutoPeftModelForSequenceClassification, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

import moa
from moa.pretrained import minilm_dir

PREFIX = "base_model.model."
TEXTS = ["short", "a much longer sentence, with several more words than the first", "middling length here"]


def perturb(model: moa.MoAModel, std: float = 0.3) -> None:
    """Random trainable parameters (B = 0 at init would make every route the base model); task logits far apart."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (3.0 if "logits" in name else std))


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).logits


def tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_batch() -> dict:
    ids = torch.randint(1, 60, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # padded rows of different lengths
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_minilm_classifier_task_exports_and_loads_with_auto_peft(tmp_path, one_thread):
    """MiniLM with 3 labels, MHR over 3 skills, the classifier trained in full: task 3 exported alone loads with
    ``AutoPeftModel``, ``AutoPeftModelForSequenceClassification`` and ``PeftModel`` and gives moa's logits."""
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=3)
    config = moa.MoAConfig(n_experts=3, r=4, router="mhr", router_options={"n_tasks": 4, "n_heads": 2},
                           target_modules=["query", "value"], modules_to_save=["classifier"])
    model = moa.attach(base, config)
    perturb(model)
    model.eval()
    batch = AutoTokenizer.from_pretrained(str(minilm_dir()))(TEXTS, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()  # padded
    want = logits(model, **batch, task_ids=[3, 3, 3])
    assert (want - logits(model, **batch, task_ids=[1, 1, 1])).abs().max() > 1e-2  # tasks differ

    folder = moa.to_peft(model, tmp_path / "task3", task=3)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["task_type"] is None and saved["r"] == 4 and saved["modules_to_save"] == ["classifier"]
    assert saved["base_model_name_or_path"] == str(minilm_dir())
    assert saved["auto_mapping"] == {"base_model_class": "BertForSequenceClassification",
                                     "parent_library": "transformers.models.bert.modeling_bert"}
    for cls in (AutoPeftModel, AutoPeftModelForSequenceClassification):  # no base given: as PEFT's own adapters
        got = logits(cls.from_pretrained(str(folder), num_labels=3).eval(), **batch)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    fresh = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=3)
    assert (logits(fresh, **batch) - want).abs().max() > 1e-2
    got = logits(PeftModel.from_pretrained(fresh, str(folder)).eval(), **batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def hand_mixture(router, pool, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's task adapter, written out: w = sigmoid(Z[t]) normalised per head, then per head block q
    ``A_t[:, q] = sum_k w_qk A_k[:, q]`` and ``B_t[q, :] = sum_k w_qk B_k[q, :]``."""
    z = router.logits_module.logits[task].detach().view(router.n_heads, router.n_experts)
    w = torch.sigmoid(z) / (torch.sigmoid(z).sum(-1, keepdim=True) + 1e-12)
    A, B = pool.A.detach(), pool.B.detach()
    h, d_in, d_out = router.n_heads, A.shape[2], B.shape[1]
    a, b = torch.zeros_like(A[0]), torch.zeros_like(B[0])
    for q in range(h):
        cols, rows = slice(q * d_in // h, (q + 1) * d_in // h), slice(q * d_out // h, (q + 1) * d_out // h)
        for k in range(router.n_experts):
            a[:, cols] += w[q, k] * A[k][:, cols]
            b[rows, :] += w[q, k] * B[k][rows, :]
    return a, b


@pytest.mark.parametrize("router,options", [
    ("poly", {"n_tasks": 3}),
    ("mhr", {"n_tasks": 3, "n_heads": 4, "granularity": "shared"}),
    ("mhr", {"n_tasks": 3, "n_heads": 2, "average": True}),  # MHR-mu: every task the skills' mean
])
def test_poly_mhr_task_export_is_the_task_mixture(tmp_path, router, options):
    pristine = tiny_classifier()
    model = moa.attach(copy.deepcopy(pristine), moa.MoAConfig(
        n_experts=3, r=4, alpha=8, router=router, router_options=options, target_modules=["query", "value"],
        modules_to_save=["classifier"]))
    perturb(model)
    model.eval()
    folder = moa.to_peft(model, tmp_path / "t2", task=2)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for name, layer in model.moa_layers().items():
        a, b = ((layer.pool.A.detach().mean(0), layer.pool.B.detach().mean(0)) if options.get("average")
                else hand_mixture(layer.router, layer.pool, 2))
        torch.testing.assert_close(tensors[f"{PREFIX}{name}.lora_A.weight"], a)
        torch.testing.assert_close(tensors[f"{PREFIX}{name}.lora_B.weight"], b)
    torch.testing.assert_close(tensors[f"{PREFIX}classifier.weight"], model.model.classifier.weight.detach())
    batch = tiny_batch()
    want = logits(model, **batch, task_ids=[2, 2, 2])
    got = logits(PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder)).eval(), **batch)
    assert (want - logits(pristine, **batch)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_static_router_on_task_ids_exports_the_task_expert(tmp_path):
    pristine = tiny_classifier()
    model = moa.attach(copy.deepcopy(pristine), moa.MoAConfig(
        n_experts=3, r=4, router="static", router_options={"key": "task_ids"}, target_modules=["query", "value"]))
    perturb(model)
    folder = moa.to_peft(model, tmp_path / "t1", task=1)
    batch = tiny_batch()
    got = logits(PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder)).eval(), **batch)
    torch.testing.assert_close(got, logits(model, **batch, task_ids=[1, 1, 1]), rtol=0, atol=1e-5)
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] is None  # nothing trained


@pytest.mark.parametrize("router,options,task,match", [
    ("topk", {}, 0, "'topk' chooses experts per token.*route="),
    ("static", {}, 0, "routes by expert_ids, not task ids.*route=e"),
    ("static", {"key": "task_ids"}, 3, "task 3 out of range"),
    ("poly", {"n_tasks": 2}, 2, r"task 2 out of range: router 'poly' has 2 tasks"),
])
def test_task_export_refuses_what_is_not_one_adapter_per_task(tmp_path, router, options, task, match):
    model = moa.attach(tiny_classifier(), moa.MoAConfig(n_experts=3, r=2, router=router, router_options=options,
                                                        target_modules=["query"]))
    with pytest.raises(ValueError, match=match):
        moa.to_peft(model, tmp_path / "out", task=task)
    assert not (tmp_path / "out").exists()


def test_task_export_argument_errors(tmp_path):
    model = moa.attach(tiny_classifier(), moa.MoAConfig(n_experts=2, r=2, router="poly", router_options={"n_tasks": 2},
                                                        target_modules=["query"]))
    with pytest.raises(ValueError, match="not both"):
        moa.to_peft(model, tmp_path / "a", route=0, task=0)
    with pytest.raises(TypeError, match="integer task id"):
        moa.to_peft(model, tmp_path / "b", task=True)
    with pytest.raises(ValueError, match="mixes expert parameters"):  # a route over skills is not what Poly computes
        moa.to_peft(model, tmp_path / "c")


def test_load_rebuilds_a_classifier_base_with_its_labels(tmp_path, one_thread):
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    base = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_dir()), id2label=labels, label2id={v: k for k, v in labels.items()})
    model = moa.attach(base, moa.MoAConfig(n_experts=2, r=4, router="static", target_modules=["query", "value"],
                                           modules_to_save=["classifier"]))
    perturb(model)
    model.eval()
    batch = AutoTokenizer.from_pretrained(str(minilm_dir()))(TEXTS, padding=True, return_tensors="pt")
    want = logits(model, **batch, expert_ids=[0, 1, 0])
    model.save_pretrained(tmp_path / "saved")
    loaded = moa.load(tmp_path / "saved")  # the base rebuilt from the recorded folder, with 3 labels
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.model.config.num_labels == 3 and loaded.model.config.id2label == labels
    torch.testing.assert_close(logits(loaded.eval(), **batch, expert_ids=[0, 1, 0]), want, rtol=0, atol=1e-5)
