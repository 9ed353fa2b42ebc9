"""HF ``Trainer`` trains a moa model with its defaults: ``remove_unused_columns=True`` reads the forward signature,
which shows the wrapped model's arguments and the routing keywords."""

from __future__ import annotations

import inspect

import pytest
import torch

import moa


@pytest.mark.slow
def test_hf_trainer_keeps_model_and_routing_columns(tmp_path, one_thread):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=2))
    model = moa.attach(base, moa.MoAConfig(n_experts=2, r=4, router="static", router_options={"key": "task_ids"},
                                           target_modules=["query", "value"]))
    names = list(inspect.signature(model.forward).parameters)
    assert names[:2] == ["input_ids", "attention_mask"] and {"labels", "task_ids", "domain_ids"} <= set(names)

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 50, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": i % 2, "task_ids": i % 2, "text": f"row {i}"} for i in range(16)]  # "text": not a model input
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-2, disable_tqdm=True)
    assert args.remove_unused_columns
    Trainer(model=model, args=args, train_dataset=rows).train()
    name_of = {id(p): n for n, p in model.named_parameters()}
    # both experts of every layer trained: the task ids reached the static router (it refuses a batch without them)
    for layer in model.moa_layers().values():
        old = before[name_of[id(layer.pool.lora_A)]].view_as(layer.pool.A)
        assert all(not torch.equal(old[e], layer.pool.A[e]) for e in range(2))
