"""Routers: the top-k softmax gate with its load-balancing loss, static routing, the registry."""

import pytest
import torch

from moa.routers import ROUTERS, Router, Routing, RoutingContext, build_router, register_router
from moa.experts import ExpertPlan


def test_topk_weights_are_renormalised_softmax_topk():
    torch.manual_seed(0)
    router = build_router("topk", 16, n_experts=6, top_k=2).eval()
    x = torch.randn(3, 5, 16)
    routing = router(x, RoutingContext())
    probs = torch.softmax(router.gate(x.reshape(-1, 16)), -1)
    top, ids = probs.topk(2)
    assert torch.equal(routing.expert_ids, ids)
    torch.testing.assert_close(routing.weights, top / top.sum(-1, keepdim=True))
    assert routing.aux_losses == {}  # no auxiliary loss in eval mode


def test_topk_with_k_equal_e_is_dense_soft_routing():
    router = build_router("topk", 8, n_experts=3, top_k=3)
    routing = router(torch.randn(4, 8), RoutingContext())
    assert routing.expert_ids is None and routing.weights.shape == (4, 3)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(4))


def test_load_balance_loss_matches_switch_formula_and_ignores_padding():
    torch.manual_seed(0)
    router = build_router("topk", 8, n_experts=4, top_k=2, aux_loss_coef=1.0).train()
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    routing = router(x, RoutingContext(token_mask=mask))
    probs = torch.softmax(router.gate(x.reshape(-1, 8)), -1)[mask.reshape(-1)]
    ids = probs.topk(2).indices
    frac = torch.bincount(ids.reshape(-1), minlength=4).float() / ids.numel()
    expected = 4 * (frac * probs.mean(0)).sum()
    torch.testing.assert_close(routing.aux_losses["load_balance"], expected)
    # uniform probabilities and balanced assignments give exactly 1 (the Switch normalisation)
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.arange(16).remainder(4).view(8, 2)
    loss = router.load_balance_loss(uniform, balanced, RoutingContext(), torch.Size([8]))
    torch.testing.assert_close(loss, torch.tensor(1.0))


def test_load_balance_loss_gradient_reaches_the_gate():
    router = build_router("topk", 8, n_experts=4, top_k=1).train()
    router(torch.randn(10, 8), RoutingContext()).aux_losses["load_balance"].backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_static_router_broadcasts_sample_ids_to_tokens_and_shares_the_plan():
    router = build_router("static", 8, n_experts=3, top_k=1)
    ctx = RoutingContext(expert_ids=torch.tensor([2, -1]))
    first = router(torch.randn(2, 4, 8), ctx)
    second = router(torch.randn(2, 4, 8), ctx)
    assert isinstance(first.expert_ids, ExpertPlan) and first.expert_ids is second.expert_ids  # built once
    assert first.expert_ids.expert_ids.view(2, 4).tolist() == [[2] * 4, [0] * 4]
    assert first.weights.view(2, 4).tolist() == [[1.0] * 4, [0.0] * 4]  # -1: no expert


def test_static_router_per_token_ids_and_errors():
    router = build_router("static", 8, n_experts=3, top_k=1)
    ids = torch.tensor([[0, 1, 2], [2, 1, 0]])
    routing = router(torch.randn(2, 3, 8), RoutingContext(expert_ids=ids))
    assert routing.expert_ids.expert_ids.view(2, 3).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="needs expert_ids"):
        router(torch.randn(2, 3, 8), RoutingContext())
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        router(torch.randn(2, 3, 8), RoutingContext(expert_ids=torch.tensor([0, 3])))
    with pytest.raises(ValueError, match="fits neither"):
        router(torch.randn(2, 3, 8), RoutingContext(expert_ids=torch.tensor([0, 1, 2])))
    domain = build_router("static", 8, n_experts=3, top_k=1, key="domain_ids")
    with pytest.raises(ValueError, match="needs domain_ids"):
        domain(torch.randn(2, 3, 8), RoutingContext(expert_ids=ids))


def test_static_router_without_its_key_names_the_key_the_call_gives():
    """moa's data modules give task_ids (and domain_ids), never expert_ids: the error says which key to route by."""
    router = build_router("static", 8, n_experts=3, top_k=1)
    with pytest.raises(ValueError, match=r"needs expert_ids.*gives task_ids, domain_ids.*router_options: \{key: task_ids\}"):
        router(torch.randn(2, 3, 8), RoutingContext(task_ids=torch.tensor([0, 1]), domain_ids=torch.tensor([1, 1])))
    with pytest.raises(ValueError, match=r"needs expert_ids.*router_options: \{key: task_ids\}"):
        router(torch.randn(2, 3, 8), RoutingContext())


def test_static_router_fixed_mixture():
    router = build_router("static", 8, n_experts=3, top_k=1)
    mix = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    routing = router(torch.randn(2, 5, 8), RoutingContext(expert_weights=mix))
    assert routing.expert_ids is None
    assert torch.equal(routing.weights.view(2, 5, 3)[:, 0], mix)


def test_registry_errors_and_custom_router():
    with pytest.raises(ValueError, match="unknown router 'nope'.*static.*topk"):
        build_router("nope", 8, 2, 1)
    with pytest.raises(ValueError, match="bad router_options"):
        build_router("topk", 8, 2, 1, temperature=3.0)

    @register_router
    class FirstExpert(Router):
        name = "test-first-expert"

        def forward(self, x, ctx):
            n = x.reshape(-1, x.shape[-1]).shape[0]
            return Routing(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1))

    try:
        routing = build_router("test-first-expert", 8, 2, 1)(torch.randn(3, 8), RoutingContext())
        assert routing.expert_ids.tolist() == [[0]] * 3
        assert build_router("test-first-expert", 8, 2, 1).param_groups() == {}
    finally:
        ROUTERS.pop("test-first-expert")
