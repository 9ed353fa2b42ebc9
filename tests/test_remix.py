"""ReMix: constant-weight sampled routing, exact draw probabilities, and the RLOO router gradient."""

import copy
import itertools
import logging
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import moa
import moa.routers.remix as remix
from moa.experts import LoRAPool
from moa.rloo import RLOOModule, repeat_batch, rloo_objective
from moa.routers import RoutingContext, build_router
from moa.routers.remix import effective_support_size, gumbel_top_k, ordered_log_prob

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*self.log.*|.*does not have many workers.*|.*gradient_checkpointing.*")


class Toy(nn.Module):
    """One linear layer over ``x [B, T, d]``; the loss couples the tokens of a sequence."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x, target=None):
        return self.proj(x)


def toy_loss(outputs, batch):
    return ((outputs.sum(1) - batch["target"]) ** 2).sum(-1)


def toy_model(n=4, k=2, r=2, d=6, seed=0, **router_options):
    torch.manual_seed(seed)
    config = moa.MoAConfig(n_experts=n, r=r, top_k=k, router="remix", target_modules=["proj"],
                           router_options={"init_std": 0.5, **router_options})
    model = moa.attach(Toy(d), config)
    with torch.no_grad():
        model.moa_layers()["proj"].pool.lora_B.normal_()
    return model


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def router_grads(model):
    return [layer.router.gate.weight.grad for layer in model.moa_layers().values()]


def test_n_equal_k_is_one_rank_kr_lora_with_weight_omega_and_the_router_gradient_is_zero():
    for scale, omega in (("lora", 2 / 8), ("rslora", 2 / 8**0.5)):
        model = toy_model(n=2, k=2, r=4, scale=scale)
        layer = model.moa_layers()["proj"]
        assert layer.pool.scaling == pytest.approx(omega)
        reference = LoRAPool(6, 6, n_experts=1, r=8, alpha=2.0 if scale == "lora" else 2.0 * 8**0.5)
        with torch.no_grad():
            reference.lora_A.copy_(layer.pool.lora_A)  # the concatenated A_i (packed rows)
            reference.lora_B.copy_(layer.pool.lora_B)  # the concatenated B_i (packed columns)
        x = torch.randn(3, 5, 6)
        expected = layer.base_layer(x) + reference(x.reshape(-1, 6), torch.zeros(15, 1, dtype=torch.long), torch.ones(15, 1)).view(3, 5, 6)
        for mode in (model.train, model.eval):
            mode()
            torch.testing.assert_close(model(x=x), expected)
    module = RLOOModule(model, n_samples=3, sample_loss=toy_loss)
    model.train()
    module.training_step({"x": x, "target": torch.randn(3, 6)}, 0).backward()
    assert all(g is None or torch.count_nonzero(g) == 0 for g in router_grads(model))
    assert layer.pool.lora_B.grad.abs().sum() > 0


def test_identical_draws_give_exactly_zero_router_gradient(monkeypatch):
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=4, r=2, top_k=2, router="remix"))
    batch_size, copies = 2, 3

    original = remix.gumbel_top_k

    def same_draw_for_every_copy(logits, k, generator=None):  # the M copies of an example draw alike
        return original(logits[: logits.shape[0] // copies], k).repeat(copies, 1)

    monkeypatch.setattr(remix, "gumbel_top_k", same_draw_for_every_copy)
    ids = torch.randint(0, 50, (batch_size, 8))
    module = RLOOModule(model, n_samples=copies)
    model.train()
    module.training_step({"input_ids": ids, "labels": ids}, 0).backward()
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in router_grads(model))
    assert any(layer.pool.lora_B.grad.abs().sum() > 0 for layer in model.moa_layers().values())


def test_rloo_objective_gradients():
    losses = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]], requires_grad=True)
    log_probs = torch.zeros(3, 2, requires_grad=True)
    rloo_objective(losses, log_probs).backward()
    # d/dlogQ[m, b] = (L[m, b] - mean_m L[:, b]) / ((M - 1) * B)
    expected = (losses - losses.mean(0)).detach() / (2 * 2)
    torch.testing.assert_close(log_probs.grad, expected)
    torch.testing.assert_close(losses.grad, torch.full((3, 2), 1 / 6))  # the plain mean for the experts
    equal = torch.full((3, 4), 0.1, requires_grad=True)
    log_probs = torch.randn(3, 4, requires_grad=True)
    rloo_objective(equal, log_probs).backward()
    assert torch.count_nonzero(log_probs.grad) == 0
    with pytest.raises(ValueError, match="M >= 2"):
        rloo_objective(torch.zeros(1, 3), None)


def test_gumbel_top_k_draws_without_replacement_with_the_probabilities_ordered_log_prob_gives():
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.0]])
    tuples = list(itertools.permutations(range(4), 2))
    ids = torch.tensor(tuples)
    probs = ordered_log_prob(logits.expand(len(tuples), -1), ids).exp()
    q = logits.softmax(-1)[0]
    by_hand = torch.stack([q[a] * q[b] / (1 - q[a]) for a, b in tuples])
    torch.testing.assert_close(probs, by_hand)
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    draws = gumbel_top_k(logits.expand(40000, -1), 2)
    assert (draws[:, 0] != draws[:, 1]).all()
    freq = torch.stack([((draws[:, 0] == a) & (draws[:, 1] == b)).float().mean() for a, b in tuples])
    assert (freq - probs).abs().max() < 0.01  # 40000 draws: standard error <= 0.0025


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_rloo_gradient_matches_the_exact_gradient_of_the_expected_loss(granularity):
    """Toy: n=4 LoRAs, k=2, two tokens per sequence. The exact gradient of E[L] enumerates every draw (ordered
    pairs per token, or per sequence); the RLOO estimate averages 4000 examples x M=4 draws in one batched step.
    Its relative error is about 0.02 here; the tolerance is 0.06 (a naive log Q = sum log q is off by 0.2-0.28)."""
    model = toy_model(granularity=granularity)
    layer = model.moa_layers()["proj"]
    torch.manual_seed(1)
    x, target = torch.randn(1, 2, 6), torch.randn(1, 6)
    x2 = x[0]
    logits = layer.router.gate(x2.mean(0, keepdim=True) if granularity == "sequence" else x2)
    q = logits.softmax(-1)

    def draw_prob(row, pair):
        a, b = pair
        return q[row, a] * q[row, b] / (1 - q[row, a])

    pairs = list(itertools.permutations(range(4), 2))
    expected_loss = 0.0
    draws = itertools.product(pairs, repeat=2) if granularity == "token" else ((p, p) for p in pairs)
    for draw in draws:
        prob = draw_prob(0, draw[0]) * draw_prob(1, draw[1]) if granularity == "token" else draw_prob(0, draw[0])
        with torch.no_grad():
            out = layer.base_layer(x2) + layer.pool(x2, torch.tensor(draw), torch.ones(2, 2))
        expected_loss = expected_loss + prob * toy_loss(out.unsqueeze(0), {"target": target})[0]
    (exact,) = torch.autograd.grad(expected_loss, layer.router.gate.weight)

    torch.manual_seed(2)
    model.train()
    RLOOModule(model, n_samples=4, sample_loss=toy_loss).training_step(
        {"x": x.expand(4000, -1, -1), "target": target.expand(4000, -1)}, 0
    ).backward()
    estimate = layer.router.gate.weight.grad
    assert float((estimate - exact).norm() / exact.norm()) < 0.06


def test_eval_routes_by_deterministic_top_k_and_padding_is_left_out_of_log_q():
    torch.manual_seed(0)
    router = build_router("remix", 8, n_experts=5, top_k=2)
    x = torch.randn(2, 4, 8)
    router.eval()
    first, second = router(x, RoutingContext()), router(x, RoutingContext())
    assert torch.equal(first.expert_ids, second.expert_ids)
    assert torch.equal(first.expert_ids, router.gate(x.reshape(-1, 8)).topk(2).indices)
    assert first.log_prob is None and torch.equal(first.weights, torch.ones(8, 2))

    router.train()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    routing = router(x, RoutingContext(token_mask=mask))
    per_token = ordered_log_prob(router.gate(x.reshape(-1, 8)).float(), routing.expert_ids).view(2, 4)
    torch.testing.assert_close(routing.log_prob, (per_token * mask).sum(1))
    assert router.last_support_size == pytest.approx(2.0)

    router = build_router("remix", 8, n_experts=5, top_k=2, granularity="sequence").train()
    routing = router(x, RoutingContext(token_mask=mask))
    ids = routing.expert_ids.view(2, 4, 2)
    assert (ids == ids[:, :1]).all()  # one draw per sequence, for all its tokens
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(routing.log_prob, ordered_log_prob(router.gate(pooled), ids[:, 0]))


def test_effective_support_size():
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0], [0.9, 0.1]])
    p = torch.tensor([0.9, 0.1])
    expected = (2.0 + 1.0 + (-(p * p.log()).sum()).exp()) / 3  # the empty row is left out
    torch.testing.assert_close(effective_support_size(weights), expected)
    torch.testing.assert_close(effective_support_size(weights, torch.tensor([1, 0, 1, 0])), torch.tensor(2.0))


def test_rloo_step_sums_the_routing_log_prob_of_every_sampling_layer_once(monkeypatch):
    """log Q [M, B] given to the objective == by hand, from each router call's input and draws, summed over layers."""
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=4, r=2, top_k=2, router="remix"))
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    for layer in model.moa_layers().values():  # every call of every router, the re-runs in backward included
        layer.router.register_forward_hook(lambda router, args, routing: calls.append((router, args[0].detach(), routing.expert_ids)))
    given = []
    original = moa.rloo.rloo_objective
    monkeypatch.setattr(moa.rloo, "rloo_objective", lambda losses, log_probs: given.append(log_probs) or original(losses, log_probs))
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    RLOOModule(model, n_samples=3).training_step({"input_ids": ids, "labels": ids}, 0).backward()
    n_layers = len(model.moa_layers())
    assert len(calls) == 2 * n_layers  # forward, and the re-run of every checkpointed layer during backward
    with torch.no_grad():
        by_hand = sum(ordered_log_prob(router.gate(x.reshape(-1, 32)).float(), drawn).view(6, 6).sum(1)
                      for router, x, drawn in calls[:n_layers])
    torch.testing.assert_close(given[0].detach(), by_hand.view(3, 2))


def test_rloo_step_under_activation_checkpointing_gives_the_same_gradients():
    base = tiny_llama()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = moa.attach(copy.deepcopy(base), moa.MoAConfig(n_experts=4, r=2, top_k=2, router="remix"))
        for layer in model.moa_layers().values():
            torch.nn.init.normal_(layer.pool.lora_B, std=0.1)
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(2)
        RLOOModule(model, n_samples=2).training_step({"input_ids": ids, "labels": ids}, 0).backward()
        grads.append([g.clone() for g in router_grads(model)] + [l.pool.lora_A.grad for l in model.moa_layers().values()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert grads[0][0].abs().sum() > 0


def test_rloo_module_trains_with_lightning_and_logs_support_sizes():
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=4, r=4, top_k=2, alpha=8, router="remix",
                                                   target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))  # omega = 1
    g = torch.Generator().manual_seed(0)
    tokens = (torch.randint(0, 50, (64, 1), generator=g) + torch.arange(10)) % 50
    data = DataLoader([{"input_ids": t, "labels": t} for t in tokens], batch_size=16)
    batch = next(iter(data))
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    gate_before = [layer.router.gate.weight.clone() for layer in model.moa_layers().values()]
    model.train()
    trainer.fit(RLOOModule(model, n_samples=2, lr=2e-2, router_lr=1e-2), data)
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 0.3
    metrics = trainer.callback_metrics
    assert metrics["train/support_size"] == pytest.approx(2.0)
    assert 1.0 <= float(metrics["train/router_support"]) <= 4.0 and "train/rloo/loss_spread" in metrics
    assert any(not torch.equal(a, l.router.gate.weight) for a, l in zip(gate_before, model.moa_layers().values()))


def test_repeat_batch_and_errors():
    batch = {"input_ids": torch.arange(6).view(2, 3), "expert_ids": [0, 1], "note": "x", "scalar": torch.tensor(1.0)}
    out = repeat_batch(batch, 3)
    assert out["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5]] * 3 and out["expert_ids"] == [0, 1] * 3
    assert out["note"] == "x" and out["scalar"].dim() == 0
    model = toy_model()
    with pytest.raises(ValueError, match="n_samples >= 2"):
        RLOOModule(model, n_samples=1, sample_loss=toy_loss)
    with pytest.raises(ValueError, match="sample_loss"):  # no head, not a causal LM: refused when it would train
        RLOOModule(model, n_samples=2).sample_loss
    with pytest.raises(ValueError, match="none"):
        RLOOModule(moa.attach(tiny_llama(), moa.MoAConfig(n_experts=2, r=2, top_k=1)), n_samples=2)
    with pytest.raises(ValueError, match="granularity"):
        build_router("remix", 8, 4, 2, granularity="batch")
    with pytest.raises(ValueError, match="scale"):
        build_router("remix", 8, 4, 2, scale="sqrt")
