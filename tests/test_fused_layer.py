"""``MoALinear``'s fused path (base GEMM with the router gate and the LoRA shrink, combine into the base output)
against an independent fp64 loop reference, ``gradcheck``, and the fallbacks to the unfused modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

import moa.experts.kernels.grouped as grouped_mod
import moa.layer as layer_mod
from moa.experts import LoRAPool
from moa.experts.kernels import cpp as cpp_mod
from moa.layer import ContextSlot, MoALinear
from moa.routers import RoutingContext, build_router

D_IN, D_OUT = 12, 10


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture
def spy(monkeypatch):
    """Records, for each fused GEMM, whether the shrink (A) and the gate went into it."""
    calls = []
    real = layer_mod.fused_shrink

    def recording(x, W, bias, A, gate_w):
        calls.append({"A": A is not None, "gate": gate_w is not None})
        return real(x, W, bias, A, gate_w)

    monkeypatch.setattr(layer_mod, "fused_shrink", recording)
    return calls


class _Ran(list):
    kind = ""


@pytest.fixture(params=["cpp", "torch"])
def kernel(request, monkeypatch, require_cpp):
    """The sparse expand under test: the C++ kernel, or (the kernel made unavailable) the grouped PyTorch path.
    Yields the list of expands that ran (their autograd functions: "cpp_expand" the kernel's, "grouped_expand" the
    PyTorch one)."""
    if request.param == "cpp":
        require_cpp()  # conftest: a failed build fails unless MOA_ALLOW_NO_CPP=1
    if request.param == "torch":
        monkeypatch.setattr(cpp_mod, "_tried", True)
        monkeypatch.setattr(cpp_mod, "_lib", None)
    ran = _Ran()
    for name, fn in (("cpp_expand", cpp_mod._CppLoRA), ("grouped_expand", grouped_mod._GroupedExpand)):
        real = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _real=real, _name=name: (ran.append(_name), _real(*a))[1])
    ran.kind = request.param
    yield ran


def check_expand(kernel, sparse):
    """The sparse cases ran the expand of the kernel under test; dense ones neither."""
    want = {"cpp": "cpp_expand", "torch": "grouped_expand"}[kernel.kind]
    assert kernel == ([want] * len(kernel) if sparse else []) and (kernel or not sparse)


def build(E, r, k, *, base=None, bias=True, dropout=0.0, seed=0, router="topk", **router_options):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=bias) if base is None else base
    base = base.double().requires_grad_(False)
    pool = LoRAPool(D_IN, D_OUT, E, r, alpha=2 * r, dropout=dropout).double()
    nn.init.normal_(pool.lora_B)
    gate = build_router(router, D_IN, E, k, **router_options).double()
    if router == "topk":
        nn.init.normal_(gate.gate.weight)  # spread the logits: no near-ties for finite differences to flip
    return MoALinear(base, pool, gate, ContextSlot())


def reference(layer, x, W=None):
    """``base(x) + sum_j w_j s B_e A_e x``: softmax top-k routing recomputed here, experts applied in a loop."""
    pool, router = layer.pool, layer.router
    W = layer.base_layer.weight if W is None else W
    bias = getattr(layer.base_layer, "bias", None)
    x2 = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(x2 @ router.gate.weight.t(), -1)
    E, k = pool.n_experts, router.top_k
    if k == E:
        w, ids = probs, torch.arange(E).expand(x2.shape[0], E)
    else:
        w, ids = probs.topk(k)
        w = w / w.sum(-1, keepdim=True)
    out = x2 @ W.t() + (0 if bias is None else bias)
    for e in range(E):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        update = (x2[token] @ pool.A[e].t() @ pool.B[e].t()) * (pool.scaling * w[token, slot]).unsqueeze(1)
        out = out.index_add(0, token, update)
    return out.reshape(*x.shape[:-1], D_OUT)


def leaves(layer):
    return {"x": None, "A": layer.pool.lora_A, "B": layer.pool.lora_B, "gate": layer.router.gate.weight}


def grads_of(fn, layer, x, g):
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(g)
    return [out.detach(), x.grad] + [t.grad for name, t in leaves(layer).items() if name != "x"]


# E, r, k, N: which expand the fused path runs (auto: dense while E*r <= 128 or N*k <= 128)
CASES = {
    "dense": (4, 4, 2, 30),
    "dense_k1": (6, 3, 1, 25),
    "soft": (4, 4, 4, 20),
    "grouped": (24, 8, 2, 80),
    "grouped_k1": (40, 4, 1, 150),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
def test_fused_layer_matches_loop_reference(case, three_d, spy, kernel):
    E, r, k, N = CASES[case]
    layer = build(E, r, k)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    if three_d:
        x = x.view(2, N // 2, D_IN) if N % 2 == 0 else x.view(1, N, D_IN)
    g = torch.randn(*x.shape[:-1], D_OUT, dtype=torch.float64)
    got = grads_of(layer, layer, x, g)
    want = grads_of(lambda x: reference(layer, x), layer, x, g)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"output/grad #{i}: {m}")
    assert spy and all(c["gate"] for c in spy)
    assert spy[0]["A"] == case.startswith(("dense", "soft"))  # sparse routing keeps the shrink out of the GEMM
    check_expand(kernel, case.startswith("grouped"))


@pytest.mark.parametrize("case", CASES)
def test_fused_layer_gradcheck(case, spy, kernel):
    E, r, k, N = CASES[case]
    layer = build(E, r, k)
    names = ["pool.lora_A", "pool.lora_B", "router.gate.weight"]
    params = dict(layer.named_parameters())

    def fn(x, A, B, gate):
        return functional_call(layer, {**params, **dict(zip(names, (A, B, gate)))}, (x.view(1, N, D_IN),))

    x = torch.randn(N, D_IN, dtype=torch.float64)
    inputs = [t.detach().clone().requires_grad_() for t in (x, *(params[n] for n in names))]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=N > 50)
    assert spy
    check_expand(kernel, case.startswith("grouped"))


@pytest.mark.parametrize("impl_case", ["dense", "grouped"])
def test_empty_experts_and_all_tokens_on_one_expert(impl_case, spy, kernel):
    E, r, N = (6, 4, 30) if impl_case == "dense" else (24, 8, 150)
    layer = build(E, r, 1)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.gate.weight[2, 0] = 100.0  # every token's top-1 is expert 2
    g = torch.randn(N, D_OUT, dtype=torch.float64)
    got = grads_of(layer, layer, x, g)
    want = grads_of(lambda x: reference(layer, x), layer, x, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    grad_A = got[2].view(E, r, D_IN)
    grad_B = got[3].view(D_OUT, E, r).permute(1, 0, 2)
    others = [e for e in range(E) if e != 2]
    for grad in (grad_A, grad_B):
        assert torch.count_nonzero(grad[others]) == 0 and torch.count_nonzero(grad[2]) > 0
    assert spy[0]["A"] == (impl_case == "dense")
    check_expand(kernel, impl_case == "grouped")


@pytest.mark.parametrize("case", ["dense", "grouped"])
def test_empty_input(case, spy, kernel):
    E, r, k, _ = CASES[case]
    layer = build(E, r, k).train()
    for shape in ((0, D_IN), (2, 0, D_IN)):
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        out = layer(x)
        assert out.shape == (*shape[:-1], D_OUT)
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.count_nonzero(layer.pool.lora_A.grad) == 0
    assert spy


def unfused(layer):
    """The same layer through the module path (an explicit impl turns the fused path off)."""
    other = MoALinear(layer.base_layer, layer.pool, layer.router, layer._slot)
    return lambda x: (setattr(layer.pool, "impl", "loop"), other(x), setattr(layer.pool, "impl", "auto"))[1]


@pytest.mark.parametrize("case", ["dense", "grouped"])
def test_aux_loss_and_usage_match_the_module_path(case):
    E, r, k, N = CASES[case]
    layer = build(E, r, k).train()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    layer(x)
    fused_aux, fused_usage = layer.aux_losses["load_balance"], layer.last_usage
    layer.pool.impl = "loop"
    layer(x)
    torch.testing.assert_close(fused_aux, layer.aux_losses["load_balance"])
    torch.testing.assert_close(fused_usage, layer.last_usage)


@pytest.mark.parametrize("case", ["dense", "grouped"])
def test_bias_free_base(case, spy, kernel):
    E, r, k, N = CASES[case]
    layer = build(E, r, k, bias=False)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x))
    assert spy
    check_expand(kernel, case == "grouped")


class ScaledLinear(nn.Linear):  # stands for a quantized / custom linear: its forward is not F.linear(x, W, b)
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("variant", ["conv1d", "subclass", "trainable_base", "explicit_impl"])
def test_fallback_to_the_module_path(variant, spy):
    base = {"conv1d": Conv1D(D_OUT, D_IN), "subclass": ScaledLinear(D_IN, D_OUT)}.get(variant)
    layer = build(6, 4, 2, base=base)
    if variant == "trainable_base":
        layer.base_layer.weight.requires_grad_(True)
    if variant == "explicit_impl":
        layer.pool.impl = "dense"
    x = torch.randn(11, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    W = layer.base_layer.weight.t() if variant == "conv1d" else layer.base_layer.weight
    want = reference(layer, x, W)
    if variant == "subclass":
        want = want + F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert not spy
    if variant == "trainable_base":
        assert layer.base_layer.weight.grad is not None


@pytest.mark.parametrize("case", ["dense", "grouped"])
def test_lora_dropout_keeps_its_own_shrink_in_training_and_fuses_in_eval(case, spy, kernel):
    E, r, k, N = CASES[case]
    layer = build(E, r, k, dropout=0.3).train()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    g = torch.randn(N, D_OUT, dtype=torch.float64)
    torch.manual_seed(5)
    got = grads_of(layer, layer, x, g)
    assert spy and not spy[0]["A"]
    torch.manual_seed(5)
    want = grads_of(unfused(layer), layer, x, g)  # the same dropout mask: dropout is the only RNG user
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    no_dropout = reference(layer, x)
    assert (got[0] - no_dropout).abs().max() > 1e-3  # the mask did change the output
    layer.eval()
    spy.clear()
    torch.testing.assert_close(layer(x), no_dropout)
    assert spy[0]["A"] == (case == "dense")


def test_jitter_routes_through_the_router_then_fuses(spy):
    layer = build(4, 4, 2, jitter_noise=0.2).train()
    x = torch.randn(15, D_IN, dtype=torch.float64)
    torch.manual_seed(3)
    got = layer(x)
    assert spy == [{"A": True, "gate": False}]
    torch.manual_seed(3)
    torch.testing.assert_close(got, unfused(layer)(x))
    layer.eval()  # no jitter at eval: the gate fuses again
    spy.clear()
    torch.testing.assert_close(layer(x), reference(layer, x))
    assert spy == [{"A": True, "gate": True}]


def test_static_router_plan_goes_through_the_fused_expand(spy, kernel):
    layer = build(30, 8, 1, router="static")
    ids = torch.randint(-1, 30, (6,))
    layer._slot.current = RoutingContext(expert_ids=ids)
    x = torch.randn(6, 25, D_IN, dtype=torch.float64)  # N*k = 150 > 128 and E*r = 240: the grouped expand
    out = layer(x)
    assert spy == [{"A": False, "gate": False}]
    pool = layer.pool
    want = x @ layer.base_layer.weight.t() + layer.base_layer.bias
    for b, e in enumerate(ids.tolist()):
        if e >= 0:
            want[b] += pool.scaling * x[b] @ pool.A[e].t() @ pool.B[e].t()
    torch.testing.assert_close(out, want)
    check_expand(kernel, True)


@pytest.mark.parametrize("with_aux", [False, True], ids=["output_only", "output_and_aux_loss"])
def test_gate_gradient_sparse_and_dense_match_the_module_path(with_aux, monkeypatch, require_cpp):
    """Without the load-balancing loss in the backward, d_logits is zero off the k selected experts and the gate's
    backward takes the sparse kernel; with it, d_logits is dense and the kernel declines (the GEMMs run). Both give
    the module path's gradients."""
    import moa.experts.kernels.fused as fused_mod

    require_cpp()
    taken = []
    real = fused_mod.sparse_gate_backward
    monkeypatch.setattr(
        fused_mod, "sparse_gate_backward", lambda *a: (lambda res: (taken.append(res[0]), res)[1])(real(*a))
    )
    E, r, k, N = CASES["grouped"]
    layer = build(E, r, k).train()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    g = torch.randn(N, D_OUT, dtype=torch.float64)
    params = [layer.router.gate.weight, layer.pool.lora_A, layer.pool.lora_B]
    grads = []
    for impl in ("auto", "loop"):  # an explicit impl turns the fused path off
        layer.pool.impl = impl
        xi = x.clone().requires_grad_()
        out = layer(xi)
        loss = (out * g).sum() + (10 * layer.aux_losses["load_balance"] if with_aux else 0)
        grads.append(torch.autograd.grad(loss, [xi, *params]))
    # without the aux loss no gradient reaches the logits: the routed kernel took the gate's (see the next test)
    assert taken == ([False] if with_aux else [])
    for fused_grad, module_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, module_grad)


@pytest.mark.parametrize("wants", [("x", "gate", "A", "B"), ("x", "A"), ("gate",), ("x",)])
def test_routed_kernel_takes_the_gate_gradient(wants, monkeypatch, require_cpp):
    """Top-k softmax routing through the C++ kernel: its backward turns the weights' gradient into that of the
    selected logits (the softmax's backward) and adds dW_gate and the gate's share of dx in its own passes; the fused
    GEMM's backward gets no d_logits. Whichever inputs want a gradient, each equals the module path's."""
    require_cpp()
    routed = []
    real = layer_mod.cpp_expand_routed
    monkeypatch.setattr(layer_mod, "cpp_expand_routed", lambda *a: (routed.append(1), real(*a))[1])
    E, r, k, N = CASES["grouped"]
    layer = build(E, r, k).train()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    g = torch.randn(N, D_OUT, dtype=torch.float64)
    named = {"gate": layer.router.gate.weight, "A": layer.pool.lora_A, "B": layer.pool.lora_B}
    grads = []
    for impl in ("auto", "loop"):
        layer.pool.impl = impl
        xi = x.clone().requires_grad_("x" in wants)
        out = layer(xi)
        grads.append(torch.autograd.grad((out * g).sum(), [xi if w == "x" else named[w] for w in wants]))
    assert routed == [1]
    for fused_grad, module_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, module_grad, rtol=1e-10, atol=1e-10)
