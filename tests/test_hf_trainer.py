"""HF ``Trainer`` trains a moa model with its defaults: ``remove_unused_columns=True`` reads the forward signature,
which shows the wrapped model's arguments and the routing keywords. ``moa.hf_trainer.MoATrainer`` checkpoints the
adapters only (as the Trainer does for PEFT), resumes from them and loads the best one at the end."""

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


def tiny_base():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3))


def tiny_classifier(r: int = 4) -> "moa.MoAModel":
    return moa.attach(tiny_base(), moa.MoAConfig(n_experts=2, r=r, router="static", router_options={"key": "task_ids"},
                                          target_modules=["query", "value"], modules_to_save=["classifier"]))


def training_rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 50, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": i % 3, "task_ids": i % 2} for i in range(16)]


@pytest.mark.slow
def test_moa_trainer_checkpoints_hold_the_adapters_and_resume(tmp_path, one_thread):
    """As PEFT's: a checkpoint holds the trained parameters, not the frozen base, and resuming from it ends where the
    uninterrupted run ends."""
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from moa.hf_trainer import MoATrainer

    def args(folder):
        return TrainingArguments(output_dir=str(tmp_path / folder), max_steps=4, per_device_train_batch_size=4,
                                 save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, learning_rate=1e-2,
                                 disable_tqdm=True, seed=0)

    full = tiny_classifier()
    MoATrainer(model=full, args=args("full"), train_dataset=training_rows()).train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"moa_config.json", "moa_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "adapter_model.safetensors"}
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    saved = load_file(str(checkpoint / "moa_model.safetensors"))
    assert sum(v.numel() for v in saved.values()) == sum(full.get_parameter(n).numel() for n in trainable)
    assert {"moa_saved.classifier.weight", "moa_saved.classifier.bias"} <= set(saved)  # the head trained in full

    resumed = tiny_classifier()
    MoATrainer(model=resumed, args=args("resumed"), train_dataset=training_rows()).train(
        resume_from_checkpoint=str(checkpoint))
    after = dict(resumed.named_parameters())
    for name in trainable:
        torch.testing.assert_close(after[name], dict(full.named_parameters())[name], rtol=0, atol=1e-6)
    final = moa.load(tmp_path / "full" / "checkpoint-4", tiny_base())  # moa.load reads a checkpoint
    assert all(torch.equal(v, full.moa_state_dict()[k]) for k, v in final.moa_state_dict().items())

    other = tiny_classifier(r=2)
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['r'\]\)"):
        MoATrainer(model=other, args=args("other"), train_dataset=training_rows()).train(
            resume_from_checkpoint=str(checkpoint))


def test_moa_trainer_loads_the_best_checkpoint_at_the_end(tmp_path, one_thread):
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from moa.hf_trainer import MoATrainer

    model = tiny_classifier()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, use_cpu=True,
                             learning_rate=1e-2, disable_tqdm=True, seed=0, load_best_model_at_end=True,
                             metric_for_best_model="loss", greater_is_better=True)  # the worse one: not the last
    rows = training_rows()
    trainer = MoATrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = load_file(str(tmp_path / "checkpoint-2" / "moa_model.safetensors"))
    assert all(torch.equal(value, best[key]) for key, value in model.moa_state_dict().items())
