"""The inference (decode) fast paths of ``MoALinear`` against the general autograd path and an independent fp64 loop:
the dense layer without autograd, the base GEMM kept apart from the shrink for few rows, a static plan's gate built
once per forward call, the routing usage computed when read; and concurrent callers with their own routing."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import moa.experts.kernels.fused as fused_mod
from moa.experts import ExpertPlan, LoRAPool
from moa.layer import ContextSlot, MoALinear
from moa.routers import RoutingContext, build_router

D_IN, D_OUT, E, R = 24, 20, 4, 3


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def make_layer(router: str, top_k: int = 1, seed: int = 0, **options) -> MoALinear:
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    pool = LoRAPool(D_IN, D_OUT, E, R, alpha=2 * R)
    nn.init.normal_(pool.lora_B, std=0.5)
    return MoALinear(base, pool, build_router(router, D_IN, E, top_k, **options), ContextSlot()).eval()


def loop_reference(layer: MoALinear, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """fp64, token by token: ``W x + b + sum_j w_j * s * B_e A_e x`` (``ids[N, k]``, ``weights[N, k]``)."""
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = (t.detach().double() for t in layer.pool.factors())
    rows = []
    for n, token in enumerate(x.reshape(-1, D_IN).double()):
        y = W @ token + b
        for e, w in zip(ids[n].tolist(), weights[n].double()):
            y = y + w * layer.pool.scaling * (B[e] @ (A[e] @ token))
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], D_OUT)


def general_path(layer: MoALinear, x: torch.Tensor) -> torch.Tensor:
    """The autograd path (x requires grad): what training runs."""
    with torch.enable_grad():
        return layer(x.clone().requires_grad_(True)).detach()


CASES = {  # name: (batch shape, task ids per sample)
    "mixed batch": ((6, 1), torch.tensor([0, 1, 2, 3, 1, 0])),
    "batch 1": ((1, 1), torch.tensor([2])),
    "all rows one expert": ((5, 1), torch.tensor([3] * 5)),
    "prefill, no expert rows": ((3, 7), torch.tensor([1, -1, 2])),
}


@pytest.mark.parametrize("case", CASES)
def test_static_inference_equals_the_general_path_and_the_loop(case):
    lead, tasks = CASES[case]
    layer = make_layer("static", key="task_ids")
    x = torch.randn(*lead, D_IN)
    layer._slot.current = RoutingContext(task_ids=tasks)
    with torch.no_grad():
        fast = layer(x)
    ids = tasks.clamp_min(0).repeat_interleave(lead[1])[:, None]
    weights = (tasks >= 0).float().repeat_interleave(lead[1])[:, None]
    torch.testing.assert_close(fast, general_path(layer, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.double(), loop_reference(layer, x, ids, weights), rtol=1e-5, atol=1e-5)


def test_topk_and_mixture_inference_equal_the_general_path():
    layer = make_layer("topk", top_k=2)
    x = torch.randn(7, 2, D_IN)
    with torch.no_grad():
        fast = layer(x)
        logits = x.reshape(-1, D_IN) @ layer.router.gate.weight.t()
    top = logits.topk(2).indices
    weights = torch.softmax(logits.gather(1, top), -1)
    torch.testing.assert_close(fast, general_path(layer, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.double(), loop_reference(layer, x, top, weights), rtol=1e-5, atol=1e-5)

    static = make_layer("static")
    mixture = torch.softmax(torch.randn(7, E), -1)
    static._slot.current = RoutingContext(expert_weights=mixture)
    with torch.no_grad():
        fast = static(x)
    every = torch.arange(E).expand(14, E)
    torch.testing.assert_close(fast, general_path(static, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        fast.double(), loop_reference(static, x, every, mixture.repeat_interleave(2, 0)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("rows", [3, 300])
def test_split_shrink_equals_the_concatenated_gemm(monkeypatch, gate, rows):
    """Few rows: base GEMM on W and one small GEMM over [A; W_gate]; many: one GEMM over the concatenation. Same
    outputs and gradients (x, A, gate) either way."""
    torch.manual_seed(1)
    x = torch.randn(rows, D_IN, dtype=torch.float64)
    W, bias = torch.randn(D_OUT, D_IN, dtype=torch.float64), torch.randn(D_OUT, dtype=torch.float64)
    A = torch.randn(E, R, D_IN, dtype=torch.float64)
    gate_w = torch.randn(E, D_IN, dtype=torch.float64) if gate else None

    def run(concat_min_rows):
        monkeypatch.setattr(fused_mod, "CONCAT_MIN_ROWS", concat_min_rows)
        leaves = [t.clone().requires_grad_(True) for t in (x, A) + ((gate_w,) if gate else ())]
        y0, h, logits, _ = fused_mod.fused_shrink(leaves[0], W, bias, leaves[1], leaves[2] if gate else None)
        loss = (y0.sin().sum() + (h * h).sum() + (logits.cos().sum() if gate else 0))
        loss.backward()
        return [y0, h, logits] + [t.grad for t in leaves]

    split, concat = run(10**9), run(0)
    for a, b in zip(split, concat):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    reference_y = x @ W.t() + bias
    torch.testing.assert_close(split[0], reference_y)
    torch.testing.assert_close(split[1], x @ A.reshape(E * R, D_IN).t())


def test_no_grad_kernels_equal_their_autograd_functions():
    torch.manual_seed(2)
    x, W, A = torch.randn(5, D_IN), torch.randn(D_OUT, D_IN), torch.randn(E, R, D_IN, requires_grad=True)
    B, gate = torch.randn(E, D_OUT, R, requires_grad=True), torch.rand(5, E)
    with torch.no_grad():
        y0, h, _, _ = fused_mod.fused_shrink(x, W, None, A, None)
        fast = fused_mod.dense_expand(y0, h, gate, B, 0.5, torch.ones(D_OUT))
    y0, h, _, _ = fused_mod.fused_shrink(x, W, None, A, None)
    slow = fused_mod.dense_expand(y0, h, gate, B, 0.5, torch.ones(D_OUT))
    assert slow.grad_fn is not None and fast.grad_fn is None
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)


def test_static_plan_builds_its_gate_once_per_weights():
    plan = ExpertPlan(torch.tensor([[0], [2], [1]]), 3)
    w = torch.tensor([[1.0], [0.0], [1.0]])
    gate = plan.dense_gate(w)
    assert plan.dense_gate(w) is gate  # the next layer of the same call: no rebuild
    other = torch.tensor([[0.5], [1.0], [2.0]])  # another weights tensor: its own gate
    torch.testing.assert_close(plan.dense_gate(other), torch.tensor([[0.5, 0, 0], [0, 0, 1.0], [0, 2.0, 0]]))
    torch.testing.assert_close(plan.dense_gate(w), torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1.0, 0]]))
    trained = other.clone().requires_grad_(True)
    assert plan.dense_gate(trained).grad_fn is not None  # gates with a gradient are not kept
    assert plan.dense_gate(trained) is not plan.dense_gate(trained)


def test_static_layers_share_one_gate_per_call():
    """Every layer of a static forward call reuses the gate its plan built (the routing metadata is built once)."""
    layers = [make_layer("static", seed=s) for s in range(3)]
    slot = ContextSlot(RoutingContext(expert_ids=torch.tensor([0, 3, 1])))
    for layer in layers:
        layer._slot = slot
    built = []
    real = ExpertPlan.dense_gate

    def counting(plan, weights):
        gate = real(plan, weights)
        built.append(gate)
        return gate

    x = torch.randn(3, 2, D_IN)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(ExpertPlan, "dense_gate", counting)
        for layer in layers:  # the layers of one forward call see one context
            layer(x)
    assert len(built) == 3 and all(g is built[0] for g in built)


def test_usage_is_computed_when_read_and_survives_a_copy():
    layer = make_layer("topk", top_k=2)
    x = torch.randn(8, D_IN)
    with torch.no_grad():
        layer(x)
        top = (x @ layer.router.gate.weight.t()).topk(2).indices
    expected = torch.bincount(top.reshape(-1), minlength=E).float() / top.numel()
    torch.testing.assert_close(layer.last_usage, expected)
    torch.testing.assert_close(copy.deepcopy(layer).last_usage, expected)


def test_concurrent_callers_keep_their_own_routing():
    """Threads serving requests at once (the server's concurrent generate calls), each a one-task batch on the
    one-expert path: each sees its own task's expert (the decision is kept in the thread's context)."""
    layer = make_layer("static", key="task_ids")
    x = torch.randn(4, 3, D_IN)
    expected = {}
    for task in range(E):
        layer._slot.current = RoutingContext(task_ids=torch.full((4,), task))
        expected[task] = general_path(layer, x)  # the autograd path, not the one-expert shortcut the threads take
    errors, barrier = [], threading.Barrier(E)

    def serve(task):
        barrier.wait()
        for _ in range(50):
            layer._slot.current = RoutingContext(task_ids=torch.full((4,), task))
            with torch.no_grad():
                out = layer(x)
            if not torch.allclose(out, expected[task], rtol=1e-6, atol=1e-6):
                errors.append(task)

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(E)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


ONE_EXPERT_CASES = {  # name: (batch shape, task ids per sample, the one expert or None for a mixed call)
    "batch 1": ((1, 1), torch.tensor([2]), 2),
    "one-task batch, prefill with padding rows' tokens": ((3, 5), torch.tensor([1, 1, 1]), 1),
    "every row the base alone": ((2, 4), torch.tensor([-1, -1]), -1),
    "mixed batch": ((4, 1), torch.tensor([0, 0, 0, 3]), None),
    "one row without an expert": ((2, 3), torch.tensor([1, -1]), None),
}


@pytest.mark.parametrize("case", ONE_EXPERT_CASES)
def test_one_expert_path_equals_the_general_path(case):
    """A call whose every token uses the same expert skips the routing machinery (decided once per call); a mixed
    call must not take that path. Both equal the autograd path and the fp64 loop."""
    lead, tasks, expert = ONE_EXPERT_CASES[case]
    layer = make_layer("static", key="task_ids")
    x = torch.randn(*lead, D_IN)
    layer._slot.current = RoutingContext(task_ids=tasks, token_mask=torch.ones(lead, dtype=torch.bool))
    with torch.no_grad():
        shortcut = layer._one_expert_forward(x)
        fast = layer(x)
    assert (shortcut is None) == (expert is None)
    ids = tasks.clamp_min(0).repeat_interleave(lead[1])[:, None]
    weights = (tasks >= 0).float().repeat_interleave(lead[1])[:, None]
    torch.testing.assert_close(fast, general_path(layer, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.double(), loop_reference(layer, x, ids, weights), rtol=1e-5, atol=1e-5)
    if expert is not None:
        torch.testing.assert_close(shortcut, fast, rtol=0, atol=0)
        torch.testing.assert_close(layer.last_usage, torch.zeros(E) if expert < 0 else torch.eye(E)[expert])


def test_arrow_fused_gate_equals_the_router_and_the_loop():
    """Arrow's logits come out of the layer's shrink GEMM (prototypes as the gate): same routing and output as the
    router's own pass and the definition."""
    layer = make_layer("arrow", top_k=2)
    nn.init.normal_(layer.pool.lora_A)
    x = torch.randn(5, 3, D_IN)
    with torch.no_grad():
        fast = layer(x)
        protos = layer.router.prototypes(layer.pool)
        scores = (x.reshape(-1, D_IN) @ protos.t()).abs()
        top = scores.topk(2).indices
        weights = torch.softmax(scores.gather(1, top), -1)
        routing = layer.router(x, RoutingContext(), layer.pool)
    torch.testing.assert_close(routing.expert_ids, top)
    torch.testing.assert_close(layer._last_routing.expert_ids, top)
    torch.testing.assert_close(fast, general_path(layer, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.double(), loop_reference(layer, x, top, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["static", "topk"])
def test_kept_transposed_factors_follow_in_place_updates(router):
    """The inference path keeps contiguous transposes of the factors (and gate); an in-place update (an optimizer
    step, load_state_dict) is seen by the next call."""
    layer = make_layer(router, top_k=2)
    x = torch.randn(6, D_IN)
    layer._slot.current = RoutingContext(expert_ids=torch.tensor([0, 1, 2, 3, 0, 1]))
    with torch.no_grad():
        layer(x)
        layer.pool.lora_A.mul_(2.0)
        layer.pool.lora_B.add_(0.1)
        if router == "topk":
            layer.router.gate.weight.neg_()
        fast = layer(x)
    torch.testing.assert_close(fast, general_path(layer, x), rtol=1e-6, atol=1e-6)
