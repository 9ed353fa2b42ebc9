"""FlyLoRA: reduction to LoRA, rank-wise gradients, frozen reproducible A, loss-free load balancing, merging."""

import copy
import logging
import warnings

import lightning as L
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import moa
from moa.experts import LoRAPool, PoolSpec
from moa.lightning import ClassificationHead, MoAModule
from moa.training_hooks import follow_optimizer
from moa.routers import RoutingContext, build_router
from moa.routers.flylora import FlyLoRAPool, average_flylora, nonzeros_per_row, sparse_projection

D_IN, D_OUT = 24, 20
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def flylora_layer(rank=8, top_k=2, alpha=16.0, name="layer", **options):
    router = build_router("flylora", D_IN, rank, top_k, **options)
    pool = router.build_pool("lora", PoolSpec(D_IN, D_OUT, rank, rank, alpha, name=name), torch.nn.ModuleDict())
    with torch.no_grad():
        pool.lora_B.normal_()
    return router, pool


def flylora_config(**router_options):
    return moa.MoAConfig(n_experts=8, r=8, alpha=16, top_k=2, router="flylora", target_modules=["query", "value"],
                         router_options=router_options)


def test_k_equal_r_with_dense_trainable_A_is_peft_lora_with_scale_alpha_over_r():
    base = tiny_bert()
    config = moa.MoAConfig(n_experts=8, r=8, alpha=16, top_k=8, router="flylora", target_modules=["query", "value"],
                           router_options={"trainable_dense_A": True, "bias_u": 0.0})
    fly = moa.attach(copy.deepcopy(base), config)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    for name, layer in fly.moa_layers().items():
        assert layer.pool.scaling == 2.0 and layer.pool.lora_A.requires_grad
        with torch.no_grad():
            layer.pool.lora_B.normal_()
        lora = peft.base_model.model.get_submodule(name)
        with torch.no_grad():
            lora.lora_A["default"].weight.copy_(layer.pool.lora_A)
            lora.lora_B["default"].weight.copy_(layer.pool.lora_B)
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    fly.train(), peft.train()
    out_fly = fly(input_ids=ids).last_hidden_state
    out_peft = peft(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out_fly, out_peft, rtol=1e-5, atol=1e-5)
    out_fly.square().sum().backward()
    out_peft.square().sum().backward()
    for name, layer in fly.moa_layers().items():
        lora = peft.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.pool.lora_A.grad, lora.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.pool.lora_B.grad, lora.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)


def test_update_uses_y_on_the_selected_ranks_and_the_bias_only_to_select():
    torch.manual_seed(0)
    for criterion in ("signed", "magnitude"):
        router, pool = flylora_layer(criterion=criterion)
        router.topk_bias.copy_(torch.linspace(-0.5, 0.5, 8))
        x = torch.randn(10, D_IN)
        routing = router(x, RoutingContext(), pool)
        y = x @ pool.lora_A.t()
        score = y + router.topk_bias
        score = score.abs() if criterion == "magnitude" else score
        expected_ids = score.topk(2, dim=-1).indices
        assert torch.equal(routing.expert_ids, expected_ids)
        mask = torch.zeros_like(y).scatter_(1, expected_ids, 1.0)
        expected = pool.scaling * (y * mask) @ pool.lora_B.t()
        torch.testing.assert_close(pool(x, routing.expert_ids, routing.weights), expected, rtol=1e-5, atol=1e-6)


def test_each_tokens_gradient_on_B_stays_in_its_selected_columns_and_A_gets_none():
    torch.manual_seed(0)
    router, pool = flylora_layer(rank=8, top_k=2)
    x = torch.randn(6, D_IN, requires_grad=True)
    routing = router(x, RoutingContext(), pool)
    out = pool(x, routing.expert_ids, routing.weights)
    for n in range(x.shape[0]):
        (grad_b,) = torch.autograd.grad(out[n].sum(), pool.lora_B, retain_graph=True)
        selected = set(routing.expert_ids[n].tolist())
        for col in range(8):
            assert (grad_b[:, col].abs().sum() > 0) == (col in selected), f"token {n}, rank {col}"
    out.sum().backward()
    assert pool.lora_A.grad is None and not pool.lora_A.requires_grad
    assert x.grad is not None and x.grad.abs().sum() > 0  # unlike the official no_grad path, x gets a gradient


def test_frozen_sparse_A_is_reproducible_per_layer_saved_and_has_no_router_parameters(tmp_path):
    torch.manual_seed(123)
    model = moa.attach(tiny_bert(), flylora_config(seed=7))
    layers = model.moa_layers()
    pools = [layer.pool for layer in layers.values()]
    p = nonzeros_per_row(32, 8, 2)
    assert p == 8
    for pool in pools:
        assert isinstance(pool, FlyLoRAPool) and pool.n_experts == 8 and pool.r == 1 and pool.scaling == 2.0
        assert ((pool.lora_A != 0).sum(1) == p).all() and not pool.lora_A.requires_grad
        torch.testing.assert_close(pool.lora_A, sparse_projection(8, 32, 2, int(pool.projection_seed)))
        assert (pool.lora_B == 0).all()
    assert not torch.equal(pools[0].lora_A, pools[1].lora_A)  # each layer its own seed
    for layer in layers.values():
        assert list(layer.router.parameters()) == [] and layer.router.param_groups() == {}
    assert set(model.param_groups()) == {"experts"}
    assert all(p_.shape == (32, 8) for p_ in model.param_groups()["experts"])  # B only

    torch.manual_seed(999)  # the global RNG does not decide A: the same seed gives the same A
    again = moa.attach(tiny_bert(), flylora_config(seed=7))
    other = moa.attach(tiny_bert(), flylora_config(seed=8))
    first = next(iter(layers))
    assert torch.equal(again.moa_layers()[first].pool.lora_A, layers[first].pool.lora_A)
    assert not torch.equal(other.moa_layers()[first].pool.lora_A, layers[first].pool.lora_A)

    for layer in layers.values():
        with torch.no_grad():
            layer.pool.lora_B.normal_()
            layer.router.topk_bias.normal_()
    model.save_pretrained(tmp_path)
    loaded = moa.load(tmp_path, tiny_bert())
    for name, layer in loaded.moa_layers().items():
        assert torch.equal(layer.pool.lora_A, layers[name].pool.lora_A) and not layer.pool.lora_A.requires_grad
        assert torch.equal(layer.pool.lora_B, layers[name].pool.lora_B)
        assert torch.equal(layer.router.topk_bias, layers[name].router.topk_bias)
    ids = torch.randint(0, 100, (2, 6))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_bias_moves_by_u_once_per_bound_optimizer_step_counting_real_tokens_in_training_only():
    torch.manual_seed(0)
    u = 0.01
    model = moa.attach(tiny_bert(), flylora_config(bias_u=u))
    layers = list(model.moa_layers().values())
    routers = [layer.router for layer in layers]
    optimizer = torch.optim.SGD(model.param_groups()["experts"], lr=0.1)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # trains nothing of these layers
    first_only = torch.optim.SGD([layers[0].pool.lora_B], lr=0.0)  # trains the first layer alone
    unbound = torch.optim.SGD(model.param_groups()["experts"], lr=0.0)
    followers = [follow_optimizer(model, opt) for opt in (optimizer, other, first_only)]
    ids = torch.randint(1, 100, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0

    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    optimizer.step()
    assert all(r.pending_counts is None and (r.topk_bias == 0).all() for r in routers)

    model.train()
    for _ in range(2):  # two micro-batches (gradient accumulation), one step
        model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    real = int(mask.sum())
    counts = [r.pending_counts.clone() for r in routers]
    assert all(int(c.sum()) == 2 * real * 2 for c in counts)  # 2 micro-batches x real tokens x k
    other.step()  # an optimizer that does not train these layers leaves them alone
    unbound.step()  # one that is not bound too
    assert all(torch.equal(r.pending_counts, c) and (r.topk_bias == 0).all() for r, c in zip(routers, counts))
    first_only.step()  # the first layer's update, and no other
    torch.testing.assert_close(routers[0].topk_bias, u * torch.sign(counts[0].mean() - counts[0]))
    assert routers[0].pending_counts is None
    assert all(torch.equal(r.pending_counts, c) and (r.topk_bias == 0).all() for r, c in zip(routers[1:], counts[1:]))
    optimizer.step()  # every layer: the first has nothing pending any more
    for r, c in zip(routers, counts):
        torch.testing.assert_close(r.topk_bias, u * torch.sign(c.mean() - c))
        assert r.pending_counts is None
    before = [r.topk_bias.clone() for r in routers]
    optimizer.step()  # no forward since: no update
    assert all(torch.equal(r.topk_bias, b) for r, b in zip(routers, before))
    for follower in followers:
        follower.remove()
    model(input_ids=ids, attention_mask=mask)
    optimizer.step()  # unbound now: the counts wait
    assert all(r.pending_counts is not None and torch.equal(r.topk_bias, b) for r, b in zip(routers, before))


def test_bias_moves_once_per_optimizer_step_under_lightning_with_gradient_accumulation():
    torch.manual_seed(0)
    u = 0.01
    model = moa.attach(tiny_bert(), flylora_config(bias_u=u))
    router = model.moa_layers()["encoder.layer.1.attention.self.value"].router
    seen_bias, seen_counts = [], []
    router.register_forward_pre_hook(lambda module, args: seen_bias.append(module.topk_bias.clone()))
    router.register_forward_hook(lambda module, args, routing: seen_counts.append(
        torch.bincount(routing.expert_ids.reshape(-1), minlength=8).float()))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": t, "labels": int(t[0] % 2)} for t in torch.randint(1, 100, (24, 6), generator=g)]
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(MoAModule(model, head=ClassificationHead(32, 2), lr=1e-2), DataLoader(rows, batch_size=4))
    assert trainer.global_step == 3 and len(seen_bias) == 6
    expected = torch.zeros(8)  # by hand: one update per step, with the counts of its two micro-batches
    for step in range(3):
        assert torch.equal(seen_bias[2 * step], expected) and torch.equal(seen_bias[2 * step + 1], expected)
        c = seen_counts[2 * step] + seen_counts[2 * step + 1]
        expected = expected + u * torch.sign(c.mean() - c)
    torch.testing.assert_close(router.topk_bias, expected)
    assert (expected != 0).any() and router.pending_counts is None
    model.train()
    model(input_ids=rows[0]["input_ids"][None])
    trainer.optimizers[0].step()  # the fit is over: its optimizer no longer moves d
    torch.testing.assert_close(router.topk_bias, expected)


def test_bias_balances_rank_usage_over_training():
    torch.manual_seed(0)
    router, pool = flylora_layer(rank=8, top_k=2, bias_u=0.05)
    router.train()
    x = torch.randn(256, D_IN) + torch.randn(D_IN) * 2  # a shared offset: a few ranks win for every token
    def usage():
        return torch.bincount(router(x, RoutingContext(), pool).expert_ids.reshape(-1), minlength=8).float()
    first = usage()
    for _ in range(60):
        router.apply_balance_update()
        last = usage()
    router.pending_counts = None
    assert last.std() < 0.5 * first.std()


def test_activation_checkpointing_counts_once_and_routes_as_the_forward_did():
    base = tiny_llama()
    grads, counts = [], []
    for checkpointing in (False, True):
        model = moa.attach(copy.deepcopy(base), moa.MoAConfig(n_experts=8, r=8, top_k=2, router="flylora"))
        torch.manual_seed(1)
        for layer in model.moa_layers().values():
            torch.nn.init.normal_(layer.pool.lora_B, std=0.1)
            layer.router.topk_bias.normal_(std=0.05)
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.arange(20).view(2, 10) % 50
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([l.pool.lora_B.grad.flatten() for l in model.moa_layers().values()]))
        counts.append(torch.stack([l.router.pending_counts for l in model.moa_layers().values()]))
        for layer in model.moa_layers().values():
            layer.router.apply_balance_update()
    torch.testing.assert_close(grads[0], grads[1])
    assert torch.equal(counts[0], counts[1]) and int(counts[1][0].sum()) == 20 * 2


def test_average_flylora_averages_B_and_bias_and_refuses_different_projections():
    torch.manual_seed(0)
    models = [moa.attach(tiny_bert(), flylora_config(seed=3)) for _ in range(3)]
    for m in models:
        for layer in m.moa_layers().values():
            with torch.no_grad():
                layer.pool.lora_B.normal_()
                layer.router.topk_bias.normal_()
    target = moa.attach(tiny_bert(), flylora_config(seed=3))
    average_flylora(target, models, weights=[0.5, 0.25, 0.25])
    for name, layer in target.moa_layers().items():
        parts = [m.moa_layers()[name] for m in models]
        torch.testing.assert_close(layer.pool.lora_B, 0.5 * parts[0].pool.lora_B + 0.25 * (parts[1].pool.lora_B + parts[2].pool.lora_B))
        torch.testing.assert_close(layer.router.topk_bias, sum(w * p.router.topk_bias for w, p in zip([0.5, 0.25, 0.25], parts)))
    same = copy.deepcopy(models[0])
    average_flylora(same, [models[0], models[0]])  # merging an adapter with itself changes nothing
    ids = torch.randint(0, 100, (2, 5))
    same.eval(), models[0].eval()
    torch.testing.assert_close(same(input_ids=ids).last_hidden_state, models[0](input_ids=ids).last_hidden_state)
    with pytest.raises(ValueError, match="different projection A"):
        average_flylora(target, [models[0], moa.attach(tiny_bert(), flylora_config(seed=4))])
    with pytest.raises(ValueError, match="2 weights for 3"):
        average_flylora(target, models, weights=[0.5, 0.5])


def test_configuration_errors_name_the_problem():
    with pytest.raises(ValueError, match="set n_experts = r"):
        moa.attach(tiny_bert(), moa.MoAConfig(n_experts=4, r=8, top_k=2, router="flylora", target_modules=["query"]))
    with pytest.raises(ValueError, match="criterion"):
        build_router("flylora", 8, 8, 2, criterion="abs")
    with pytest.raises(ValueError, match="expert_options"):
        moa.attach(tiny_bert(), moa.MoAConfig(n_experts=8, r=8, top_k=2, router="flylora", target_modules=["query"],
                                              expert_options={"foo": 1}))
    router = build_router("flylora", D_IN, 8, 2)
    with pytest.raises(ValueError, match="rank-1 experts"):
        router(torch.randn(3, D_IN), RoutingContext(), LoRAPool(D_IN, D_OUT, 8, 2))
