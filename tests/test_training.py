"""Training: MoAModule under a real Lightning Trainer, optimizer groups, auxiliary losses, checkpointing."""

import copy
import logging
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import moa
from moa.lightning import ClassificationHead, MoAModule

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    )


def trainer(steps):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0)


def lm_batches(n=64, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 50, (n, 1), generator=g)
    tokens = (start + torch.arange(length)) % 50
    return [{"input_ids": t, "labels": t} for t in tokens]


def test_topk_pool_trains_with_lightning_and_only_moa_parameters_move():
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=4, r=4, top_k=2, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    frozen = {k: v.clone() for k, v in model.model.state_dict().items() if "pool" not in k and "router" not in k}
    module = MoAModule(model, lr=2e-2, router_lr=1e-3)
    data = DataLoader(lm_batches(), batch_size=16)
    batch = next(iter(data))
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    model.train()
    t = trainer(30)
    t.fit(module, data)
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 0.3
    assert "train/aux/load_balance" in t.callback_metrics and "train/routing_entropy" in t.callback_metrics
    for key, value in model.model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), f"frozen {key} changed"
    groups = {g["name"]: g for g in t.optimizers[0].param_groups}
    assert groups["experts"]["lr"] == 2e-2 and groups["router"]["lr"] == 1e-3
    n_router = sum(p.numel() for p in groups["router"]["params"])
    assert n_router == sum(layer.router.gate.weight.numel() for layer in model.moa_layers().values())


def test_domain_experts_with_classification_head_and_validation():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16))
    config = moa.MoAConfig(n_experts=2, r=4, router="static", router_options={"key": "domain_ids"})
    model = moa.attach(bert, config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (96, 8), generator=g)
    domain = torch.randint(0, 2, (96,), generator=g)
    # the label is a token parity whose meaning flips with the domain: one expert per domain can learn it
    labels = ((ids[:, 1] % 2) ^ domain).long()
    rows = [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "domain_ids": d, "labels": y}
            for i, d, y in zip(ids, domain, labels)]
    module = MoAModule(model, head=ClassificationHead(32, 2, pooling="mean"), lr=1e-2)
    t = trainer(40)
    t.fit(module, DataLoader(rows, batch_size=32, shuffle=True), DataLoader(rows, batch_size=48))
    assert t.callback_metrics["val/accuracy"] > 0.6
    assert "experts" in {g["name"] for g in t.optimizers[0].param_groups}


def test_module_errors():
    with pytest.raises(TypeError, match="MoAModel"):
        MoAModule(tiny_llama())
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=2, r=2, top_k=1))
    with pytest.raises(ValueError, match="no loss"):
        MoAModule(model).training_step({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, 0)


def test_activation_checkpointing_sees_the_same_routing_context():
    """Layers re-run during backward must route exactly as in the forward pass."""
    base = tiny_llama()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = moa.attach(copy.deepcopy(base), moa.MoAConfig(n_experts=3, r=4, router="static"))
        for layer in model.moa_layers().values():
            torch.nn.init.normal_(layer.pool.lora_B, std=0.1)
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.arange(20).view(2, 10) % 50
        model(input_ids=ids, labels=ids, expert_ids=[2, 1]).loss.backward()
        grads.append(torch.cat([l.pool.lora_A.grad.flatten() for l in model.moa_layers().values()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_deepcopy_after_a_training_forward():
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=4, r=4, top_k=2, target_modules=["q_proj"]))
    ids = torch.randint(0, 50, (2, 6))
    model(input_ids=ids, labels=ids)  # topk leaves graph tensors (aux losses) on the layers
    assert model.aux_loss() is not None and model.aux_loss().requires_grad
    clone = copy.deepcopy(model)
    model.eval(), clone.eval()
    torch.testing.assert_close(clone(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_optimizer_a_subclass_configures_is_followed_during_the_fit_only():
    """MoAModule binds the Trainer's optimizers when training starts (moa.training_hooks), so the optimizer of a
    subclass's own configure_optimizers drives FlyLoRA's bias update, once per step, and is unbound at the end."""

    class OwnOptimizer(MoAModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.param_groups()["experts"], lr=1e-2)

    u = 0.5
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=8, r=8, top_k=2, router="flylora", target_modules=["q_proj"],
                                                   router_options={"bias_u": u}))
    router = next(iter(model.moa_layers().values())).router
    counts = []
    router.register_forward_hook(lambda m, args, routing: counts.append(torch.bincount(routing.expert_ids.reshape(-1), minlength=8)))
    module = OwnOptimizer(model)
    t = trainer(3)
    t.fit(module, DataLoader(lm_batches(n=48), batch_size=16))
    assert module._followers == [] and t.global_step == 3 and len(counts) == 3
    expected = sum(u * torch.sign(c.float().mean() - c.float()) for c in counts)  # one update per step
    torch.testing.assert_close(router.topk_bias, expected)
    model(**{k: v[None] for k, v in lm_batches(n=1)[0].items()})
    t.optimizers[0].step()  # after the fit: not followed any more
    torch.testing.assert_close(router.topk_bias, expected)


def test_the_readme_training_loss_works_for_a_router_without_an_auxiliary_loss():
    """README: ``loss = out.loss + model.aux_loss()``; static routing has no auxiliary loss (aux_loss() was None)."""
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=2, r=4, router="static", target_modules=["q_proj"]))
    ids = torch.randint(0, 50, (2, 6))
    out = model(input_ids=ids, labels=ids, expert_ids=[0, 1])
    assert model.aux_losses() == {}
    loss = out.loss + model.aux_loss()
    assert loss.item() == out.loss.item()
    loss.backward()
