"""Poly and MHR routers: the correctness checks of the issue (algorithms.md sections 1, 2, 8, 9), PEFT equivalence,
mixed-task batches, relaxed-Bernoulli training, granularity and save/load, resize, MHR-z / MHR-mu, inspection.

Every model is built from a config (hidden size 32, 2 layers): nothing is downloaded.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import pytest
import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import moa
from moa.lightning import ClassificationHead, MoAModule
from moa.routers import RoutingContext
from moa.routers.poly import SHARED_KEY, TaskSkillLogits, mix_skills, skills_from_split_layout, skills_to_split_layout
from moa.transfer import (
    load_peft_poly,
    plot_task_skill_matrix,
    prepare_transfer,
    resize_tasks,
    task_routers,
    task_skill_matrix,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*")

D_IN, D_OUT = 16, 24


class OneLinear(nn.Module):
    def __init__(self, d_in=D_IN, d_out=D_OUT):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def one_layer(router="poly", K=3, r=2, seed=0, randomize=True, **options):
    """A MoA model around a single linear layer, with random (nonzero) skills."""
    torch.manual_seed(seed)
    options.setdefault("n_tasks", 4)
    config = moa.MoAConfig(n_experts=K, r=r, router=router, target_modules=["proj"], router_options=options)  # no top_k
    model = moa.attach(OneLinear(), config).eval()
    if randomize:
        randomize_skills(model)
    return model


@torch.no_grad()
def randomize_skills(model, logit_scale=1.0):
    for layer in model.moa_layers().values():
        layer.pool.lora_A.normal_()
        layer.pool.lora_B.normal_()
    for router in task_routers(model).values():
        router.logits_module.logits.normal_(std=logit_scale)


def layer_of(model):
    return next(iter(model.moa_layers().values()))


def plain_lora(x, base, A, B, scaling):
    """y = W0 x + b + s * B A x for one LoRA (A [r, d_in], B [d_out, r])."""
    return base(x) + scaling * (x @ A.T) @ B.T


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


# -- section 9: the most important checks -------------------------------------------------------------------------


def test_poly_with_one_skill_in_eval_equals_plain_lora_with_scale_one_over_r():
    model = one_layer("poly", K=1, r=4)
    layer = layer_of(model)
    assert layer.pool.scaling == pytest.approx(1 / 4)  # alpha = 1, as mttl and PEFT
    x = torch.randn(3, 5, D_IN)
    out = model(x, task_ids=torch.tensor([0, 3, 1]))
    expected = plain_lora(x, layer.base_layer, layer.pool.A[0], layer.pool.B[0], 1 / 4)
    torch.testing.assert_close(out, expected)


def test_mhr_with_one_skill_equals_one_lora_with_head_blocks_stacked_in_order():
    h, r = 4, 3
    model = one_layer("mhr", K=1, r=r, n_heads=h)
    layer = layer_of(model)
    # per-head blocks in the mttl / PEFT layout: A [h, K, d_in/h, r], B [h, K, r, d_out/h]
    a_split, b_split = torch.randn(h, 1, D_IN // h, r), torch.randn(h, 1, r, D_OUT // h)
    A, B = skills_from_split_layout(a_split, b_split)
    with torch.no_grad():
        layer.pool.A.copy_(A)
        layer.pool.B.copy_(B)
    a_lora = torch.cat([a_split[q, 0] for q in range(h)], dim=0)  # [d_in, r]: heads stacked along the input
    b_lora = torch.cat([b_split[q, 0] for q in range(h)], dim=1)  # [r, d_out]: heads concatenated along the output
    x = torch.randn(2, 7, D_IN)
    out = model(x, task_ids=torch.tensor([1, 2]))
    torch.testing.assert_close(out, plain_lora(x, layer.base_layer, a_lora.T, b_lora.T, 1 / r))
    back = skills_to_split_layout(A, B, h)
    assert torch.equal(back[0], a_split) and torch.equal(back[1], b_split)


def test_mhr_heads_pick_rows_and_columns_piecewise_from_different_skills():
    h, K, r = 4, 3, 2
    model = one_layer("mhr", K=K, r=r, n_heads=h, n_tasks=2)
    layer = layer_of(model)
    choice = [2, 0, 1, 2]  # task 0: head q routes (one-hot) to skill choice[q]
    with torch.no_grad():
        z = torch.full((h, K), -1e4)
        z[torch.arange(h), torch.tensor(choice)] = 1e4
        layer.router.logits_module.logits[0] = z.reshape(-1)
    A, B = layer.pool.A, layer.pool.B
    a_expected = torch.cat([A[k][:, q * D_IN // h:(q + 1) * D_IN // h] for q, k in enumerate(choice)], dim=1)
    b_expected = torch.cat([B[k][q * D_OUT // h:(q + 1) * D_OUT // h] for q, k in enumerate(choice)], dim=0)
    x = torch.randn(2, 3, D_IN)
    out = model(x, task_ids=torch.tensor([0, 0]))
    torch.testing.assert_close(out, plain_lora(x, layer.base_layer, a_expected, b_expected, 1 / r))


# -- section 8: secondary checks ------------------------------------------------------------------------------------


def test_poly_one_hot_routing_equals_that_skills_lora():
    model = one_layer("poly", K=4, r=2, n_tasks=1)
    layer = layer_of(model)
    with torch.no_grad():
        layer.router.logits_module.logits.copy_(torch.tensor([[-1e4, -1e4, 1e4, -1e4]]))
    x = torch.randn(5, D_IN)
    out = model(x, task_ids=torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(out, plain_lora(x, layer.base_layer, layer.pool.A[2], layer.pool.B[2], 1 / 2))


def test_uniform_weights_mix_parameters_not_outputs():
    model = one_layer("poly", K=3, r=2, n_tasks=1)
    layer = layer_of(model)
    with torch.no_grad():
        layer.router.logits_module.logits.zero_()  # sigmoid 0.5 for every skill: weights 1/K
    x = torch.randn(4, D_IN)
    out = model(x, task_ids=torch.zeros(4, dtype=torch.long))
    A, B = layer.pool.A, layer.pool.B
    parameter_mix = plain_lora(x, layer.base_layer, A.mean(0), B.mean(0), 1 / 2)  # (mean B)(mean A)
    output_mix = layer.base_layer(x) + 0.5 * torch.stack([x @ A[k].T @ B[k].T for k in range(3)]).mean(0)
    torch.testing.assert_close(out, parameter_mix)
    assert (out - output_mix).abs().max() > 0.1  # mean(B A) is a different model


def test_mhr_with_identical_rows_for_all_heads_equals_poly():
    h = 4
    poly = one_layer("poly", K=3, r=2, n_tasks=3)
    mhr = one_layer("mhr", K=3, r=2, n_tasks=3, n_heads=h, randomize=False)
    with torch.no_grad():  # same base layer and skills
        layer_of(mhr).base_layer.load_state_dict(layer_of(poly).base_layer.state_dict())
        poly_z = layer_of(poly).router.logits_module.logits
        layer_of(mhr).router.logits_module.logits.copy_(poly_z.repeat(1, h))  # [T, K] -> [T, h*K], head-major
        layer_of(mhr).pool.lora_A.copy_(layer_of(poly).pool.lora_A)
        layer_of(mhr).pool.lora_B.copy_(layer_of(poly).pool.lora_B)
    x, tasks = torch.randn(3, 4, D_IN), torch.tensor([2, 0, 2])
    torch.testing.assert_close(mhr(x, task_ids=tasks), poly(x, task_ids=tasks))


def test_mhr_z_leaves_only_the_routing_logits_trainable_and_redraws_them():
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=3, r=2, router="mhr", target_modules=["q_proj", "v_proj"],
                                                   router_options={"n_tasks": 5, "n_heads": 4}))
    randomize_skills(model, logit_scale=3.0)
    prepare_transfer(model, "z", n_tasks=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith("skill_logits.logits") for name in trainable)
    assert len(trainable) == 4  # one Z per adapted layer
    for router in task_routers(model).values():
        z = router.logits_module.logits
        assert z.shape == (1, 4 * 3) and z.abs().max() <= 1e-3  # fresh row, mttl's U(-1e-3, 1e-3)
    assert set(model.param_groups()) == {"router"}
    model.train()
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 0])).loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert model.config.router_options["n_tasks"] == 1


def test_mhr_mu_output_equals_one_lora_built_from_the_per_head_skill_averages():
    h, K, r = 4, 3, 2
    model = one_layer("mhr", K=K, r=r, n_heads=h, n_tasks=3)
    layer = layer_of(model)
    prepare_transfer(model, "mu", n_tasks=1)
    a_split, b_split = skills_to_split_layout(layer.pool.A, layer.pool.B, h)  # [h, K, d_in/h, r], [h, K, r, d_out/h]
    a_avg = torch.cat([a_split[q].mean(0) for q in range(h)], dim=0)  # per-head average of the skills, stacked
    b_avg = torch.cat([b_split[q].mean(0) for q in range(h)], dim=1)
    x = torch.randn(2, 5, D_IN)
    expected = plain_lora(x, layer.base_layer, a_avg.T, b_avg.T, 1 / r)
    torch.testing.assert_close(model(x), expected)  # no task ids needed
    torch.testing.assert_close(model(x, task_ids=torch.tensor([0, 0])), expected)
    assert not layer.router.logits_module.logits.requires_grad
    assert all(p.requires_grad for p in layer.pool.parameters())
    assert model.config.router_options["average"] is True


def test_poly_fine_tuning_trains_skills_and_fresh_logits():
    model = one_layer("poly", K=3, r=2, n_tasks=6)
    prepare_transfer(model, "full", n_tasks=2)
    layer = layer_of(model)
    assert layer.router.logits_module.logits.shape == (2, 3) and layer.router.logits_module.logits.abs().max() <= 1e-3
    assert all(p.requires_grad for p in layer.pool.parameters()) and layer.router.logits_module.logits.requires_grad
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    with pytest.raises(ValueError, match="unknown adaptation mode"):
        prepare_transfer(model, "zz")


# -- PEFT ---------------------------------------------------------------------------------------------------------


PEFT_TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_poly(base, n_heads=1, K=3, r=2, T=5, targets=PEFT_TARGETS, seed=1):
    """An HF PEFT Poly model around a copy of ``base``, with random skills (B nonzero) and routing logits."""
    from peft import PolyConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), PolyConfig(
        task_type="CAUSAL_LM", poly_type="poly", n_splits=n_heads, n_skills=K, n_tasks=T, r=r, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "poly_" in name:
                param.normal_(std=0.5 if "logits" not in name else 2.0)
    return peft_model


def moa_poly(base, n_heads=1, K=3, r=2, T=5, targets=PEFT_TARGETS, **options):
    router = "poly" if n_heads == 1 else "mhr"
    options = {"n_tasks": T, **({} if n_heads == 1 else {"n_heads": n_heads}), **options}
    return moa.attach(base, moa.MoAConfig(n_experts=K, r=r, router=router, target_modules=targets, router_options=options))


def peft_and_moa(n_heads=1, **kw):
    """A PEFT Poly model and a moa model with the same base, skills and routing logits."""
    base = tiny_llama()
    peft_model = peft_poly(base, n_heads, **kw)
    model = moa_poly(base, n_heads, **kw)
    load_peft_poly(model, peft_model)
    return peft_model, model


class NoiseTape:
    """Stands in for ``torch.rand``: hands out uniforms from its own seeded generator, in order, and records the shape
    of every draw. PEFT draws its relaxed-Bernoulli noise with ``torch.rand`` (inside ``RelaxedBernoulli.rsample``),
    moa with ``torch.rand`` too, so replaying one tape in each feeds both the same u, draw for draw."""

    def __init__(self, monkeypatch, seed=0):
        self.monkeypatch, self.seed = monkeypatch, seed

    def __enter__(self):
        self.shapes, generator = [], torch.Generator().manual_seed(self.seed)

        def rand(*size, dtype=None, device=None, **_):
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
            self.shapes.append(shape)
            return torch.empty(shape, dtype=torch.float64).uniform_(generator=generator).to(dtype or torch.float32)

        self.monkeypatch.setattr(torch, "rand", rand)
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()

    @staticmethod
    def first_draw(seed, shape):
        """What the first draw of a tape with this seed hands out."""
        return torch.empty(shape, dtype=torch.float64).uniform_(generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_heads", [1, 4])
def test_same_weights_in_peft_poly_and_moa_give_the_same_outputs(n_heads):
    peft_model, model = peft_and_moa(n_heads)
    peft_model.eval(), model.eval()
    ids, tasks = torch.randint(0, 100, (4, 7)), torch.tensor([3, 0, 3, 4])
    with torch.no_grad():
        expected = peft_model(input_ids=ids, task_ids=tasks).logits
        out = model(input_ids=ids, task_ids=tasks).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), model.disable_adapters():
        assert (model(input_ids=ids).logits - expected).abs().max() > 1e-2  # the adapters do change the output


@pytest.mark.parametrize("n_heads", [1, 4])
def test_training_mode_matches_peft_with_the_same_noise_drawn_per_example(monkeypatch, n_heads):
    """Train mode, one task for the whole batch: PEFT draws u per example ([B, h, K] per layer); so does moa."""
    peft_model, model = peft_and_moa(n_heads)
    peft_model.train(), model.train()
    ids, tasks = torch.randint(0, 100, (4, 7)), torch.full((4,), 3)
    runs = {}
    for name, net in (("peft", peft_model), ("moa", model)):
        net.zero_grad()
        with NoiseTape(monkeypatch, seed=11) as tape:
            out = net(input_ids=ids, labels=ids, task_ids=tasks)
        out.loss.backward()
        runs[name] = out.logits.detach(), tape.shapes
    assert runs["moa"][1] == runs["peft"][1] == [(4, n_heads, 3)] * 6  # one [B, h, K] draw per layer, same order
    torch.testing.assert_close(runs["moa"][0], runs["peft"][0], rtol=1e-5, atol=1e-5)
    # the gradients agree too: skills (in PEFT's layout) and routing logits
    peft_layers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "poly_lora_A")}
    for name, layer in model.moa_layers().items():
        source = next(m for n, m in peft_layers.items() if n.endswith("." + name))
        grad_a, grad_b = skills_from_split_layout(source.poly_lora_A["default"].grad, source.poly_lora_B["default"].grad)
        K, d_out, r = grad_b.shape
        torch.testing.assert_close(layer.pool.lora_A.grad.view(grad_a.shape), grad_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.pool.lora_B.grad.view(d_out, K, r).permute(1, 0, 2), grad_b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.router.logits_module.logits.grad,
                                   source.poly_router["default"].module_logits.grad, rtol=1e-4, atol=1e-6)


def test_examples_of_one_task_get_different_noise_in_training_and_one_adapter_in_eval():
    model = one_layer("mhr", K=3, r=2, n_heads=2, n_tasks=4)
    layer = layer_of(model)
    x = torch.randn(1, 1, D_IN).expand(5, 3, D_IN)  # five identical examples of task 2 (identical tokens)
    tasks = torch.full((5,), 2)
    model.train()
    routing = layer.router(x, RoutingContext(task_ids=tasks), layer.pool)
    assert routing.factors[0].shape == (5, 2, D_IN) and routing.factors[1].shape == (5, D_OUT, 2)  # one per example
    assert routing.expert_ids.expert_ids.view(5, 3).tolist() == [[b] * 3 for b in range(5)]
    out = model(x, task_ids=tasks)
    for b in range(1, 5):
        assert not torch.allclose(out[0], out[b])  # different mixtures for the same input and task
        torch.testing.assert_close(out[b, 0], out[b, 2])  # one mixture for all tokens of an example
    model.eval()
    routing = layer.router(x, RoutingContext(task_ids=tasks), layer.pool)
    assert routing.factors[0].shape == (1, 2, D_IN)  # no noise: the examples share the task's adapter
    out = model(x, task_ids=tasks)
    torch.testing.assert_close(out, out[:1].expand_as(out))


def test_per_token_task_ids_draw_noise_per_example_and_task(monkeypatch):
    model = one_layer("poly", K=3, r=2, n_tasks=4).train()
    layer = layer_of(model)
    x, tasks = torch.randn(2, 3, D_IN), torch.tensor([[0, 0, 3], [3, 3, 3]])
    with NoiseTape(monkeypatch, seed=3) as tape:
        out = model(x, task_ids=tasks)
    assert tape.shapes == [(3, 1, 3)]  # groups (example 0, task 0), (0, 3), (1, 3)
    u = NoiseTape.first_draw(3, (3, 3)).float()
    z = layer.router.logits_module.logits.detach()
    s = torch.sigmoid(z[[0, 3, 3]] + u.log() - (-u).log1p())
    w = s / (s.sum(-1, keepdim=True) + 1e-12)
    A, B = layer.pool.A.detach(), layer.pool.B.detach()
    for (b, t), g in {(0, 0): 0, (0, 1): 0, (0, 2): 1, (1, 0): 2, (1, 1): 2, (1, 2): 2}.items():
        a_g, b_g = torch.einsum("k,kri->ri", w[g], A), torch.einsum("k,kor->or", w[g], B)
        torch.testing.assert_close(out[b, t], plain_lora(x[b, t], layer.base_layer, a_g, b_g, 1 / 2))


def assert_state_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_load_peft_poly_refuses_peft_layers_the_moa_model_does_not_adapt():
    base = tiny_llama()
    peft_model = peft_poly(base, targets=["q_proj", "v_proj", "down_proj"])
    model = moa_poly(base, targets=["q_proj", "v_proj"])
    randomize_skills(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"does not adapt the PEFT Poly layers .*layers\.0\.mlp\.down_proj"):
        load_peft_poly(model, peft_model)
    assert_state_unchanged(model, before)


def test_load_peft_poly_refuses_moa_layers_peft_does_not_adapt_and_leaves_the_model_unchanged():
    base = tiny_llama()
    peft_model = peft_poly(base, targets=["q_proj", "v_proj"])
    model = moa_poly(base, targets=["q_proj", "v_proj", "down_proj"])  # layer 0's down_proj comes after q and v
    randomize_skills(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"moa layer 'model\.layers\.0\.mlp\.down_proj' has 0 PEFT Poly layers"):
        load_peft_poly(model, peft_model)
    assert_state_unchanged(model, before)


LAST = "model.layers.1.mlp.down_proj"  # the last layer the import visits


def _break_last_peft_layer(peft_model, what):
    layer = next(m for n, m in peft_model.named_modules() if n.endswith(LAST))
    if what == "tasks":
        layer.poly_router["default"].module_logits = nn.Parameter(torch.zeros(6, 3))
    elif what == "rank":
        a = layer.poly_lora_A["default"]
        layer.poly_lora_A["default"] = nn.Parameter(torch.zeros(*a.shape[:3], 3))
        layer.poly_lora_B["default"] = nn.Parameter(torch.zeros(1, 3, 3, layer.out_features))
    elif what == "heads":
        layer.n_splits["default"] = 2


@pytest.mark.parametrize("what, message", [
    ("tasks", r"model\.layers\.1\.mlp\.down_proj: PEFT routing logits \(6, 3\) vs \(5, 3\)"),
    ("rank", r"model\.layers\.1\.mlp\.down_proj: PEFT skills A \(3, 3, 64\)"),
    ("heads", r"model\.layers\.1\.mlp\.down_proj: PEFT n_splits=2 but the router has n_heads=1"),
    ("scale", r"model\.layers\.0\.self_attn\.q_proj: PEFT Poly scales by 1/r; this pool scales by 1"),
    ("granularity", r"model\.layers\.0\.self_attn\.q_proj: PEFT Poly has one router per layer"),
    ("average", r"MHR-mu"),
])
def test_load_peft_poly_refuses_every_mismatch_and_leaves_the_model_unchanged(what, message):
    base = tiny_llama()
    peft_model = peft_poly(base)
    _break_last_peft_layer(peft_model, what)
    options = {"granularity": "shared"} if what == "granularity" else {}
    model = moa.attach(base, moa.MoAConfig(n_experts=3, r=2, alpha=2.0 if what == "scale" else None, router="poly",
                                           target_modules=PEFT_TARGETS, router_options={"n_tasks": 5, **options}))
    if what == "average":
        prepare_transfer(model, "mu", n_tasks=5)
    randomize_skills(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        load_peft_poly(model, peft_model)
    assert_state_unchanged(model, before)


def test_activation_checkpointing_recomputes_with_the_same_per_example_noise():
    base = tiny_llama()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = moa_poly(copy.deepcopy(base), n_heads=2, targets=["q_proj", "v_proj"])
        randomize_skills(model)
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.arange(30).view(3, 10) % 50
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids, task_ids=[1, 1, 4]).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for group in model.param_groups().values() for p in group]))
    torch.testing.assert_close(grads[0], grads[1])


def test_training_noise_is_pytorch_relaxed_bernoulli_with_temperature_one():
    logits = TaskSkillLogits(n_tasks=3, n_heads=2, n_skills=4)
    with torch.no_grad():
        logits.logits.normal_(std=2.0)
    torch.manual_seed(7)
    ours = logits.weights(sample=True)
    torch.manual_seed(7)
    s = RelaxedBernoulli(torch.tensor(1.0), logits=logits.logits.view(3, 2, 4)).rsample()
    torch.testing.assert_close(ours, s / (s.sum(-1, keepdim=True) + 1e-12))
    plain = torch.sigmoid(logits.logits.view(3, 2, 4))
    torch.testing.assert_close(logits.weights(), plain / plain.sum(-1, keepdim=True))
    torch.testing.assert_close(logits.weights().sum(-1), torch.ones(3, 2))


# -- batches, training ----------------------------------------------------------------------------------------------


def test_mixed_task_batch_equals_each_sample_alone_and_mixes_only_the_tasks_present():
    model = one_layer("mhr", K=3, r=2, n_heads=2, n_tasks=6)
    x, tasks = torch.randn(5, 4, D_IN), torch.tensor([4, 1, 4, 5, 1])
    batched = model(x, task_ids=tasks)
    for b in range(5):
        torch.testing.assert_close(batched[b:b + 1], model(x[b:b + 1], task_ids=tasks[b:b + 1]))
    layer = layer_of(model)
    routing = layer.router(x, RoutingContext(task_ids=tasks), layer.pool)
    assert routing.factors[0].shape == (3, 2, D_IN) and routing.factors[1].shape == (3, D_OUT, 2)  # tasks 1, 4, 5
    assert routing.expert_ids.expert_ids.view(5, 4)[:, 0].tolist() == [1, 0, 1, 2, 0]
    torch.testing.assert_close(routing.usage.sum(), torch.tensor(1.0))
    # per-token task ids work too
    per_token = tasks[:, None].expand(5, 4)
    torch.testing.assert_close(model(x, task_ids=per_token), batched)


def test_task_plan_is_built_once_per_forward_and_shared_by_all_layers():
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=2, r=2, router="poly", target_modules=["q_proj", "v_proj"],
                                                   router_options={"n_tasks": 3}))
    ids = torch.randint(0, 100, (2, 5))
    model(input_ids=ids, task_ids=[2, 0])
    ctx = model._slot.current
    plans = [v for k, v in ctx.cache.items() if k[0] == "poly-tasks"]
    assert len(plans) == 1 and plans[0][0].tolist() == [0, 2]


def test_relaxed_bernoulli_only_in_training_and_gradients_reach_skills_and_logits():
    model = one_layer("poly", K=4, r=2)
    x, tasks = torch.randn(3, D_IN), torch.tensor([0, 1, 1])
    with torch.no_grad():
        assert torch.equal(model(x, task_ids=tasks), model(x, task_ids=tasks))  # eval: deterministic sigmoid
    model.train()
    first = model(x, task_ids=tasks)
    assert not torch.allclose(first, model(x, task_ids=tasks))  # training: Gumbel-sigmoid draws
    first.pow(2).sum().backward()
    layer = layer_of(model)
    z_grad = layer.router.logits_module.logits.grad
    assert z_grad[[0, 1]].abs().sum() > 0 and z_grad[[2, 3]].abs().sum() == 0  # only the tasks in the batch
    assert layer.pool.lora_A.grad.abs().sum() > 0 and layer.pool.lora_B.grad.abs().sum() > 0
    deterministic = one_layer("poly", K=4, r=2, relaxed_bernoulli=False).train()
    assert torch.equal(deterministic(x, task_ids=tasks), deterministic(x, task_ids=tasks))


def test_generate_with_beams_repeats_task_ids():
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=2, r=2, router="poly", target_modules=["q_proj"],
                                                   router_options={"n_tasks": 2}))
    randomize_skills(model)
    ids = torch.randint(1, 100, (2, 4))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=[1, 0], num_beams=2,
                         max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


def test_two_speed_learning_rate_puts_the_logits_in_the_router_group():
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=3, r=2, router="mhr", target_modules=["q_proj", "v_proj"],
                                                   router_options={"n_tasks": 2, "n_heads": 2}))
    groups = {g["name"]: g for g in MoAModule(model, lr=1e-3, router_lr=0.1).configure_optimizers().param_groups}
    assert groups["router"]["lr"] == 0.1 and groups["experts"]["lr"] == 1e-3
    z_ids = {id(r.logits_module.logits) for r in task_routers(model).values()}
    assert {id(p) for p in groups["router"]["params"]} == z_ids and len(z_ids) == 4
    assert groups["router"]["weight_decay"] == 0.0



def test_multi_task_training_learns_conflicting_tasks_with_lightning(one_thread):
    """Two tasks label the same inputs oppositely: only task routing can fit both; Poly does."""
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16))
    config = moa.MoAConfig(n_experts=4, r=4, router="poly", target_modules=["query", "value", "output.dense"],
                           router_options={"n_tasks": 2})
    model = moa.attach(bert, config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (128, 6), generator=g)
    task = torch.arange(128) % 2
    labels = ((ids[:, 0] < 20).long() ^ task).long()
    rows = [{"input_ids": i, "task_ids": t, "labels": y} for i, t, y in zip(ids, task, labels)]
    module = MoAModule(model, head=ClassificationHead(32, 2, pooling="first"), lr=2e-2, router_lr=0.1)
    trainer = L.Trainer(max_steps=160, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, DataLoader(rows, batch_size=32, shuffle=True))
    module.eval()
    with torch.no_grad():
        logits = module({"input_ids": ids, "task_ids": task})
    assert (logits.argmax(-1) == labels).float().mean() > 0.85  # a task-blind model gets 0.5
    weights = task_skill_matrix(model)
    differs = [float((w[0] - w[1]).abs().max()) for w in weights.values()]
    assert max(differs) > 0.05  # the two tasks route to different skills


# -- granularity, persistence, resize -------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["layer", "shared"])
def test_save_load_round_trip(tmp_path, granularity):
    config = moa.MoAConfig(n_experts=3, r=2, router="mhr", target_modules=["q_proj", "v_proj", "down_proj"],
                           router_options={"n_tasks": 4, "n_heads": 2, "granularity": granularity})
    model = moa.attach(tiny_llama(), config).eval()
    randomize_skills(model)
    ids, tasks = torch.randint(0, 100, (3, 6)), torch.tensor([3, 1, 3])
    with torch.no_grad():
        expected = model(input_ids=ids, task_ids=tasks).logits
    logit_keys = [k for k in model.moa_state_dict() if "logits" in k]
    if granularity == "shared":
        assert logit_keys == [f"moa_shared.{SHARED_KEY}.logits"]
        assert len({id(r.logits_module) for r in task_routers(model).values()}) == 1
        assert set(model.param_groups()["router"][0:1]) == {model.shared[SHARED_KEY].logits}
    else:
        assert len(logit_keys) == 6
    model.save_pretrained(tmp_path)
    loaded = moa.load(tmp_path, tiny_llama()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, task_ids=tasks).logits, expected)
    state = loaded.moa_state_dict()
    for key, value in model.moa_state_dict().items():
        assert torch.equal(state[key], value), key


def test_shared_logits_sample_once_per_call_and_collect_gradient_from_every_layer():
    config = moa.MoAConfig(n_experts=3, r=2, router="poly", target_modules=["q_proj", "v_proj"],
                           router_options={"n_tasks": 2, "granularity": "shared"})
    model = moa.attach(tiny_llama(), config).train()
    randomize_skills(model)
    ids = torch.randint(0, 100, (2, 5))
    model(input_ids=ids, labels=ids, task_ids=[1, 1]).loss.backward()
    draws = [v for k, v in model._slot.current.cache.items() if k[0] == "poly-weights"]
    assert len(draws) == 1 and draws[0].shape == (2, 1, 3)  # one draw per example (one task here), for all layers
    assert not torch.allclose(draws[0][0], draws[0][1])
    assert model.shared[SHARED_KEY].logits.grad.abs().sum() > 0


def test_resize_tasks_keeps_or_redraws_rows_and_round_trips(tmp_path):
    config = moa.MoAConfig(n_experts=3, r=2, router="poly", target_modules=["q_proj"], router_options={"n_tasks": 3})
    model = moa.attach(tiny_llama(), config)
    randomize_skills(model, logit_scale=2.0)
    old = task_routers(model)["model.layers.0.self_attn.q_proj"].logits_module.logits.detach().clone()
    resize_tasks(model, 5, keep_existing=True)
    z = task_routers(model)["model.layers.0.self_attn.q_proj"].logits_module.logits
    assert z.shape == (5, 3) and torch.equal(z[:3], old) and z[3:].abs().max() <= 1e-3
    resize_tasks(model, 2)
    z = task_routers(model)["model.layers.0.self_attn.q_proj"].logits_module.logits
    assert z.shape == (2, 3) and z.abs().max() <= 1e-3  # mttl: every row re-drawn
    model.save_pretrained(tmp_path)
    loaded = moa.load(tmp_path, tiny_llama())
    assert task_routers(loaded)["model.layers.0.self_attn.q_proj"].n_tasks == 2
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 1\]"):
        loaded(input_ids=torch.randint(0, 100, (1, 3)), task_ids=[2])


def test_mhr_mu_and_shared_resize_round_trip(tmp_path):
    config = moa.MoAConfig(n_experts=3, r=2, router="mhr", target_modules=["q_proj"],
                           router_options={"n_tasks": 3, "n_heads": 2, "granularity": "shared"})
    model = moa.attach(tiny_llama(), config)
    randomize_skills(model)
    prepare_transfer(model, "mu", n_tasks=1)
    assert model.shared[SHARED_KEY].logits.shape == (1, 6)
    ids = torch.randint(0, 100, (2, 4))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = moa.load(tmp_path, tiny_llama())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


# -- initialisation, options, errors, inspection --------------------------------------------------------------------


def test_initialisation_follows_the_official_code():
    model = one_layer("mhr", K=4, r=8, n_heads=4, n_tasks=10, randomize=False, seed=3)
    layer = layer_of(model)
    bound = 1 / math.sqrt(3 * D_IN)  # gain(leaky_relu, sqrt 5) / sqrt(d_in), the full d_in
    A = layer.pool.lora_A
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.pool.lora_B) == 0
    z = layer.router.logits_module.logits
    assert z.shape == (10, 16) and z.abs().max() <= 1e-3 and z.abs().max() > 0
    explicit = moa.attach(OneLinear(), moa.MoAConfig(n_experts=2, r=4, alpha=8, router="poly", target_modules=["proj"],
                                                    router_options={"n_tasks": 1}))
    assert layer_of(explicit).pool.scaling == 2.0  # an explicit alpha is kept


def test_clear_errors_for_bad_options_and_inputs():
    with pytest.raises(ValueError, match="n_tasks"):
        moa.attach(OneLinear(), moa.MoAConfig(n_experts=2, r=2, router="poly", target_modules=["proj"]))
    with pytest.raises(ValueError, match="n_heads"):
        moa.attach(OneLinear(), moa.MoAConfig(n_experts=2, r=2, router="mhr", target_modules=["proj"],
                                              router_options={"n_tasks": 2}))
    with pytest.raises(ValueError, match="use router='mhr'"):
        moa.attach(OneLinear(), moa.MoAConfig(n_experts=2, r=2, router="poly", target_modules=["proj"],
                                              router_options={"n_tasks": 2, "n_heads": 2}))
    with pytest.raises(ValueError, match="must divide"):
        moa.attach(OneLinear(), moa.MoAConfig(n_experts=2, r=2, router="mhr", target_modules=["proj"],
                                              router_options={"n_tasks": 2, "n_heads": 5}))
    with pytest.raises(ValueError, match="granularity"):
        moa.attach(OneLinear(), moa.MoAConfig(n_experts=2, r=2, router="poly", target_modules=["proj"],
                                              router_options={"n_tasks": 2, "granularity": "block"}))
    model = one_layer("poly", n_tasks=2)
    x = torch.randn(2, D_IN)
    with pytest.raises(ValueError, match="pass task_ids"):
        model(x)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 1\]"):
        model(x, task_ids=[0, 2])
    with pytest.raises(TypeError, match="integer"):
        model(x, task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no task-routed layers"):
        task_routers(moa.attach(OneLinear(), moa.MoAConfig(n_experts=2, r=2, target_modules=["proj"])))


def test_routers_that_ignore_top_k_do_not_need_it_and_the_others_still_check_it():
    from moa.routers import ROUTERS, Router, register_router

    for router, options in (("poly", {"n_tasks": 2}), ("mhr", {"n_tasks": 2, "n_heads": 2})):
        config = moa.MoAConfig(n_experts=1, r=2, router=router, router_options=options, target_modules=["proj"])
        assert config.top_k == 1  # the default top_k=2 > n_experts=1 is not held against a router that ignores it
        assert moa.MoAConfig.from_dict(config.to_dict()).top_k == 1
        model = moa.attach(OneLinear(), config).eval()
        randomize_skills(model)
        layer = layer_of(model)
        x = torch.randn(3, D_IN)
        torch.testing.assert_close(model(x, task_ids=[0, 1, 1]),
                                   plain_lora(x, layer.base_layer, layer.pool.A[0], layer.pool.B[0], 1 / 2))
    assert moa.MoAConfig(n_experts=2, top_k=7, router="xcross").top_k == 1
    assert moa.MoAConfig(n_experts=2, top_k=7, router="static").top_k == 1
    for router in ("topk", "flylora", "remix"):  # these read top_k: still validated
        assert ROUTERS[router].uses_top_k
        with pytest.raises(ValueError, match="top_k must be between 1 and n_experts=2"):
            moa.MoAConfig(n_experts=2, top_k=3, router=router)

    @register_router
    class FixedRouter(Router):  # a router declares it, and the config follows
        name = "test-fixed-one"
        uses_top_k = False

    try:
        assert moa.MoAConfig(n_experts=1, top_k=5, router="test-fixed-one").top_k == 1
    finally:
        del ROUTERS["test-fixed-one"]


def test_task_skill_matrix_and_heat_map(tmp_path):
    model = moa.attach(tiny_llama(), moa.MoAConfig(n_experts=3, r=2, router="mhr", target_modules=["q_proj", "v_proj"],
                                                   router_options={"n_tasks": 5, "n_heads": 2}))
    randomize_skills(model)
    matrices = task_skill_matrix(model)
    assert set(matrices) == set(model.moa_layers())
    for name, w in matrices.items():
        assert w.shape == (5, 2, 3)
        torch.testing.assert_close(w.sum(-1), torch.ones(5, 2))
        router = model.moa_layers()[name].router
        expected = torch.sigmoid(router.logits_module.logits.detach()).view(5, 2, 3)
        torch.testing.assert_close(w, expected / expected.sum(-1, keepdim=True))
    path = plot_task_skill_matrix(model, tmp_path / "skills.png", task_names=[f"t{i}" for i in range(5)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_mix_skills_matches_the_mttl_einsum_in_split_layout():
    K, h, r, G = 3, 4, 2, 5
    A, B, w = torch.randn(K, r, D_IN), torch.randn(K, D_OUT, r), torch.rand(G, h, K)
    a_split, b_split = skills_to_split_layout(A, B, h)
    # PEFT / mttl: einsum then reshape (A heads along d_in) and transpose(1, 2) + reshape (B heads along d_out)
    a_ref = torch.einsum("bqs,qsdr->bqdr", w, a_split).reshape(G, D_IN, r)
    b_ref = torch.einsum("bqs,qsrd->bqrd", w, b_split).transpose(1, 2).reshape(G, r, D_OUT)
    a_mix, b_mix = mix_skills(A, B, w)
    torch.testing.assert_close(a_mix, a_ref.transpose(1, 2))
    torch.testing.assert_close(b_mix, b_ref.transpose(1, 2))


def test_merge_and_peft_export_refuse_parameter_mixing_routers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = moa.attach(base, moa.MoAConfig(n_experts=2, r=2, router="poly", target_modules=["q_proj"],
                                           router_options={"n_tasks": 3}))
    with pytest.raises(ValueError, match="mixes expert parameters"):
        moa.to_peft(model, tmp_path / "out", route=0)
    with pytest.raises(ValueError, match="mixes expert parameters"):
        model.merge(0)


def test_poly_mixes_hypernetwork_generated_skills():
    """Poly over HypeLoRA's generated experts: the layer computes W0 x + s B_t A_t x with the generated skills
    mixed by the task's weights (checked by hand on one layer)."""
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    model = moa.attach(base, moa.MoAConfig(n_experts=3, r=4, router="poly", router_options={"n_tasks": 2},
                                           expert_kind="hyper", target_modules=["query", "value"])).eval()
    with torch.no_grad():  # the hypernetwork starts with B = 0 (PEFT's start): move it off zero
        for p in model.shared.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.shared.apply(lambda m: getattr(m, "invalidate", lambda: None)())
    name, layer = next(iter(model.moa_layers().items()))
    seen = {}
    handle = layer.register_forward_hook(lambda module, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(input_ids=torch.randint(1, 50, (2, 5)), task_ids=torch.tensor([1, 0]))
    handle.remove()
    A, B = layer.pool.A, layer.pool.B  # generated [K, r, d_in], [K, d_out, r]
    s = torch.sigmoid(layer.router.logits_module.logits.detach())
    w = s / (s.sum(-1, keepdim=True) + 1e-12)
    for row, task in enumerate([1, 0]):
        A_t, B_t = torch.einsum("k,kri->ri", w[task], A), torch.einsum("k,kor->or", w[task], B)
        x = seen["x"][row]
        update = layer.pool.scaling * x @ A_t.T @ B_t.T
        assert update.abs().max() > 1e-4  # the generated skills are not zero: the check has teeth
        torch.testing.assert_close(seen["y"][row], layer.base_layer(x) + update, rtol=1e-4, atol=1e-5)
