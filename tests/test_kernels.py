"""The grouped expert LoRA op: every implementation against an fp64 reference, gradients, edge cases."""

import pytest
import torch

from moa.experts import IMPLS, ExpertPlan, LoRAPool, choose_impl, grouped_lora
from moa.experts.errors import UserError
from moa.experts.kernels import cpp as cpp_mod
from moa.experts.kernels import grouped as grouped_mod

# Every CPU implementation by name, so one that is not installed shows as skipped rather than vanishing
# (triton runs under the interpreter in tests/test_triton_kernel.py).
IMPL_NAMES = ["loop", "dense", "grouped", "scatter", "cpp"]
NOT_INSTALLED = {
    "scatter": "torch-scatter is not installed (pip install '.[scatter]')",
    "cpp": "the C++ kernel is disabled (MOA_NO_CPP=1)",
}


def skip_unavailable(name, require_cpp):
    """Skip an impl that is not installed; ``cpp``: conftest's ``require_cpp`` (a failed build fails the test unless
    ``MOA_ALLOW_NO_CPP=1``)."""
    if name == "cpp":
        require_cpp()
    elif name not in IMPLS:
        pytest.skip(NOT_INSTALLED[name])


@pytest.fixture(params=IMPL_NAMES)
def impl(request, require_cpp):
    skip_unavailable(request.param, require_cpp)
    return request.param


def test_every_registered_cpu_impl_is_tested():
    assert set(IMPLS) - {"triton"} <= set(IMPL_NAMES)


def reference(x, A, B, ids, w, scaling):
    """fp64 einsum over gathered experts: sum_j w_j * s * B_e A_e x."""
    x, A, B, w = (t.double() for t in (x, A, B, w))
    lead = x.shape[:-1]
    x2, ids2, w2 = x.reshape(-1, x.shape[-1]), ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1])
    out = torch.einsum("nk,nkor,nkri,ni->no", w2 * scaling, B[ids2], A[ids2], x2)
    return out.reshape(*lead, B.shape[1])


def make(N, d_in, d_out, E, r, k, dtype=torch.float32, seed=0, skew=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d_in, generator=g, dtype=dtype)
    A = torch.randn(E, r, d_in, generator=g, dtype=dtype)
    B = torch.randn(E, d_out, r, generator=g, dtype=dtype)
    logits = torch.randn(N, E, generator=g)
    if skew is not None:
        logits[:, skew] += 100.0
    w, ids = logits.softmax(-1).topk(k)
    return x, A, B, ids, w.to(dtype)


SHAPES = [
    # N, d_in, d_out, E, r, k
    (37, 24, 20, 5, 4, 2),
    (64, 32, 32, 8, 8, 1),  # k = 1
    (3, 16, 12, 6, 4, 2),  # N*k smaller than any block
    (50, 32, 16, 4, 8, 4),  # k = E: every expert
    (40, 20, 28, 7, 3, 3),  # odd sizes: not 16-byte aligned, grouped falls back to segment loops
]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_fp64_reference(impl, shape):
    x, A, B, ids, w = make(*shape)
    out = grouped_lora(x, A, B, ids, w, scaling=0.5, impl=impl)
    torch.testing.assert_close(out.double(), reference(x, A, B, ids, w, 0.5), rtol=1e-5, atol=1e-4)


def test_gradcheck_fp64(impl):
    x, A, B, ids, w = make(11, 8, 6, 4, 3, 2, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, A, B, w)]
    assert torch.autograd.gradcheck(lambda x, A, B, w: grouped_lora(x, A, B, ids, w, 0.7, impl=impl), inputs)


def test_gradcheck_dense_soft_routing(impl):
    g = torch.Generator().manual_seed(1)
    x, A, B = torch.randn(9, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.randn(3, 5, 2, generator=g)
    gate = torch.randn(9, 3, generator=g).softmax(-1)
    inputs = [t.double().requires_grad_() for t in (x, A, B, gate)]
    assert torch.autograd.gradcheck(lambda x, A, B, g: grouped_lora(x, A, B, None, g, 1.3, impl=impl), inputs)


@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_fp32_grouped_mm_path_gradients_match_loop(layout, monkeypatch):
    """The fast paths (bmm over the padded layout, torch grouped_mm over the ragged one) against the loop."""
    x, A, B, ids, w = make(96, 32, 48, 8, 8, 2)
    if layout == "ragged":
        monkeypatch.setattr(ExpertPlan, "padded", property(lambda self: False))
    grads = {}
    for impl in ("loop", "grouped"):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, w)]
        out = grouped_lora(*leaves[:3], ids, leaves[3], 2.0, impl=impl)
        out.backward(torch.ones_like(out))
        grads[impl] = [out] + [t.grad for t in leaves]
    for got, want in zip(grads["grouped"], grads["loop"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_expert_without_tokens_and_all_tokens_on_one_expert(impl):
    # skew: every token's top-1 is expert 2; with k=1 experts 0,1,3,4 get nothing
    x, A, B, ids, w = make(30, 16, 16, 5, 4, 1, skew=2)
    assert (ids == 2).all()
    leaves = [t.clone().requires_grad_() for t in (A, B)]
    out = grouped_lora(x, *leaves, ids, w, 1.0, impl=impl)
    torch.testing.assert_close(out.double(), reference(x, A, B, ids, w, 1.0), rtol=1e-5, atol=1e-4)
    out.sum().backward()
    for grad in leaves:
        assert torch.count_nonzero(grad.grad[[0, 1, 3, 4]]) == 0
        assert torch.count_nonzero(grad.grad[2]) > 0


def test_three_d_inputs(impl):
    x, A, B, ids, w = make(2 * 7, 16, 12, 4, 4, 2)
    x3, ids3, w3 = x.view(2, 7, 16), ids.view(2, 7, 2), w.view(2, 7, 2)
    out = grouped_lora(x3, A, B, ids3, w3, 1.0, impl=impl)
    assert out.shape == (2, 7, 12)
    torch.testing.assert_close(out.reshape(14, 12), grouped_lora(x, A, B, ids, w, 1.0, impl="loop"))


def test_dense_soft_routing_equals_sum_over_all_experts(impl):
    x, A, B, _, _ = make(20, 16, 8, 4, 4, 2)
    gate = torch.randn(20, 4).softmax(-1)
    ids = torch.arange(4).expand(20, 4)
    out = grouped_lora(x, A, B, None, gate, 0.5, impl=impl)
    torch.testing.assert_close(out.double(), reference(x, A, B, ids, gate, 0.5), rtol=1e-5, atol=1e-4)


# Relative Frobenius-norm error against fp64 on the same (rounded) inputs: measured ~4e-4 (fp16) and ~3.5e-3
# (bf16) for every impl; the bounds leave headroom yet fail a 4 % scale error by an order of magnitude.
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(got, want):
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(64, 32, 32, 8, 8, 2), (37, 24, 20, 5, 4, 2)])
def test_half_precision_forward_and_backward_match_fp64(impl, dtype, shape):
    x, A, B, ids, w = make(*shape, dtype=dtype)
    g = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(3)).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, w)]
    out = grouped_lora(*leaves[:3], ids, leaves[3], 0.5, impl=impl)
    out.backward(g)
    assert out.dtype == dtype
    ref_leaves = [t.double().requires_grad_() for t in (x, A, B, w)]
    ref = reference(*ref_leaves[:3], ids, ref_leaves[3], 0.5)
    ref.backward(g.double())
    assert rel_err(out, ref) < HALF_TOL[dtype], rel_err(out, ref)
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == dtype
        assert rel_err(got.grad, want.grad) < 2 * HALF_TOL[dtype]


def test_empty_input(impl):
    """N = 0 tokens: an empty result of the right shape, and a backward that gives empty / zero gradients."""
    x, A, B, ids, w = make(5, 16, 12, 4, 4, 2)
    for lead, sparse in (((0,), True), ((0,), False), ((2, 0), True)):
        x0 = x.new_zeros(*lead, 16).requires_grad_()
        ids0 = ids.new_zeros(*lead, 2) if sparse else None
        w0 = w.new_zeros(*lead, 2 if sparse else 4).requires_grad_()
        leaves = [t.clone().requires_grad_() for t in (A, B)]
        out = grouped_lora(x0, *leaves, ids0, w0, 1.0, impl=impl)
        assert out.shape == (*lead, 12)
        out.sum().backward()
        assert x0.grad.shape == x0.shape and w0.grad.shape == w0.shape
        for leaf in leaves:
            assert leaf.grad is not None and torch.count_nonzero(leaf.grad) == 0


def test_plan_is_reusable_and_validated():
    x, A, B, ids, w = make(40, 16, 16, 4, 4, 2)
    plan = ExpertPlan(ids, 4)
    assert plan.counts.sum() == 80 and int(plan.offsets[-1]) == 80
    out1 = grouped_lora(x, A, B, plan, w, 1.0, impl="grouped")
    out2 = grouped_lora(x * 2, A, B, plan, w, 1.0, impl="grouped")
    torch.testing.assert_close(out2, 2 * out1)
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 3\]"):
        ExpertPlan(ids + 3, 4)
    with pytest.raises(TypeError, match="integer"):
        ExpertPlan(w, 4)


def test_padding_layout_only_when_routing_is_balanced():
    balanced = ExpertPlan(torch.arange(64).remainder(8).view(32, 2), 8)
    skewed = ExpertPlan(torch.zeros(32, 2, dtype=torch.long), 8)
    assert balanced.padded and not skewed.padded
    assert balanced.row_valid.sum() == 64 and balanced.row_pair.numel() == 8 * balanced.capacity


def test_shape_errors_name_the_problem():
    x, A, B, ids, w = make(10, 16, 8, 4, 4, 2)
    with pytest.raises(ValueError, match="features"):
        grouped_lora(x[:, :8], A, B, ids, w)
    with pytest.raises(ValueError, match="disagree"):
        grouped_lora(x, A, B[:, :, :2], ids, w)
    with pytest.raises(ValueError, match="must match"):
        grouped_lora(x, A, B, ids[:, :1], w)
    with pytest.raises(ValueError, match="one per expert"):
        grouped_lora(x, A, B, None, w)
    with pytest.raises(ValueError, match="unknown grouped_lora impl 'fast'"):
        grouped_lora(x, A, B, ids, w, impl="fast")


def test_auto_choice_follows_documented_crossover():
    sparse = "cpp" if cpp_mod.available() else None
    assert choose_impl(2048, 8, 16, 2) == (sparse or "dense")  # E*r = 128
    assert choose_impl(2048, 8, 8, 2) == (sparse or "dense")  # E*r = 64: the cpp kernel's crossover
    assert choose_impl(2048, 4, 8, 2) == "dense"  # E*r = 32
    assert choose_impl(2048, 64, 16, 2) == (sparse or "grouped")  # E*r = 1024
    assert choose_impl(4, 64, 16, 2) == "dense"  # a handful of tokens: no sort
    assert choose_impl(2048, 64, 16, None) == "dense"  # soft routing


def test_segment_loop_fallback_when_grouped_mm_is_unavailable(monkeypatch):
    monkeypatch.setattr(grouped_mod, "_GROUPED_MM", None)
    monkeypatch.setattr(ExpertPlan, "padded", property(lambda self: False))
    x, A, B, ids, w = make(33, 16, 16, 4, 4, 2)
    torch.testing.assert_close(
        grouped_lora(x, A, B, ids, w, impl="grouped").double(), reference(x, A, B, ids, w, 1.0), rtol=1e-5, atol=1e-4
    )


def test_pool_is_packed_and_views_share_storage():
    pool = LoRAPool(16, 12, n_experts=3, r=4, alpha=8)
    assert pool.lora_A.shape == (12, 16) and pool.lora_B.shape == (12, 12)
    assert pool.A.data_ptr() == pool.lora_A.data_ptr() and pool.B.data_ptr() == pool.lora_B.data_ptr()
    assert pool.scaling == 2.0
    assert torch.count_nonzero(pool.lora_B) == 0  # PEFT init: B = 0 ...
    bound = 1 / 16**0.5  # ... and A kaiming-uniform(a=sqrt(5)) per expert: U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert pool.lora_A.abs().max() <= bound and pool.lora_A.std() > bound / 3
    with torch.no_grad():
        pool.lora_B.normal_()
    x = torch.randn(5, 16)
    ids = torch.full((5, 1), 1)
    expected = 2.0 * x @ pool.A[1].t() @ pool.B[1].t()
    torch.testing.assert_close(pool(x, ids, torch.ones(5, 1)), expected)
    torch.testing.assert_close(pool.delta_weight(torch.tensor([0.0, 1.0, 0.0])), 2.0 * pool.B[1] @ pool.A[1])


# --- the C++ kernel (experts/kernels/lora_cpu.cpp) ---------------------------------------------------------------

GRAD_CASES = {
    # name: (N, d_in, d_out, E, r, k, skew)
    "k1": (13, 9, 7, 4, 3, 1, None),
    "empty_experts": (6, 8, 5, 7, 2, 2, None),  # 12 pairs over 7 experts, at least one empty
    "one_expert": (10, 8, 6, 5, 3, 1, 2),  # every token on expert 2, the others empty
    "one_expert_k2": (10, 8, 6, 5, 3, 2, 2),  # top-1 expert 2 for all, second slot spread
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck_edge_cases(impl, case):
    N, d_in, d_out, E, r, k, skew = GRAD_CASES[case]
    x, A, B, ids, w = make(N, d_in, d_out, E, r, k, dtype=torch.float64, seed=4, skew=skew)
    if case == "one_expert":
        assert (ids == 2).all()
    if case == "empty_experts":
        assert (torch.bincount(ids.reshape(-1), minlength=E) == 0).any()
    inputs = [t.requires_grad_() for t in (x, A, B, w)]
    assert torch.autograd.gradcheck(lambda x, A, B, w: grouped_lora(x, A, B, ids, w, 0.7, impl=impl), inputs)


def test_gradcheck_three_d_and_empty(impl):
    x, A, B, ids, w = make(2 * 5, 8, 6, 4, 3, 2, dtype=torch.float64, seed=5)
    ids3 = ids.view(2, 5, 2)
    inputs = [x.view(2, 5, 8).requires_grad_(), A.requires_grad_(), B.requires_grad_(), w.view(2, 5, 2).requires_grad_()]
    assert torch.autograd.gradcheck(lambda x, A, B, w: grouped_lora(x, A, B, ids3, w, 0.7, impl=impl), inputs)
    empty = [x.new_zeros(0, 8).requires_grad_(), A, B, w.new_zeros(0, 2).requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda x, A, B, w: grouped_lora(x, A, B, ids.new_zeros(0, 2), w, 0.7, impl=impl), empty
    )


@pytest.fixture
def cpp(require_cpp):
    require_cpp()


# sizes that exercise the vector chunks, the single-vector loop and the scalar tail of every kernel loop (fp64:
# 8 lanes, chunks of 32; fp32: 16 lanes, chunks of 64), rank remainders of the 4-row tiles, tiles of fewer than 4
# pairs, and the bench shape
CPP_SHAPES = [
    (70, 100, 70, 6, 5, 2),
    (33, 64, 40, 4, 16, 3),
    (9, 768, 768, 64, 16, 2),
    (300, 768, 768, 64, 16, 2),
    (41, 13, 130, 3, 1, 1),
    (45, 40, 50, 3, 20, 2),  # rank above the 16 x 16 tiles of the B transpose: a second, partial rank block
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", CPP_SHAPES)
def test_cpp_matches_loop_forward_and_backward(cpp, shape, dtype):
    x, A, B, ids, w = make(*shape, dtype=dtype, seed=6)
    g = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(7), dtype=dtype)
    results = {}
    for impl in ("loop", "cpp"):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, w)]
        out = grouped_lora(*leaves[:3], ids, leaves[3], 0.5, impl=impl)
        out.backward(g)
        results[impl] = [out.detach()] + [t.grad for t in leaves]
    tol = {"rtol": 1e-11, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}
    for i, (got, want) in enumerate(zip(results["cpp"], results["loop"])):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"output/grad #{i}: {m}")


def test_cpp_two_threads_bitwise_equal_one_thread(cpp):
    """Each output row, dx row, dA / dB expert is computed by one thread in a fixed order: the result does not
    depend on the thread count."""
    x, A, B, ids, w = make(500, 96, 80, 12, 8, 2, seed=8)
    g = torch.randn(500, 80, generator=torch.Generator().manual_seed(9))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (x, A, B, w)]
            out = grouped_lora(*leaves[:3], ids, leaves[3], 0.5, impl="cpp")
            out.backward(g)
            results.append([out.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_cpp_reads_strided_rows_and_pool_views(cpp):
    """x with a row stride (a slice of a wider tensor) and the pool's strided B view, against the loop."""
    pool = LoRAPool(48, 40, n_experts=6, r=4, alpha=8)
    with torch.no_grad():
        pool.lora_B.normal_()
    wide = torch.randn(30, 64)
    x = wide[:, 5:53]
    assert x.stride() == (64, 1) and pool.B.stride(-1) == 1 and not pool.B.is_contiguous()
    _, _, _, ids, w = make(30, 48, 40, 6, 4, 2, seed=10)
    torch.testing.assert_close(
        grouped_lora(x, pool.A, pool.B, ids, w, 2.0, impl="cpp"),
        grouped_lora(x, pool.A, pool.B, ids, w, 2.0, impl="loop"),
        rtol=1e-5, atol=1e-5,
    )


def test_cpp_falls_back_to_grouped_when_the_build_failed(monkeypatch):
    if "cpp" not in IMPLS:
        pytest.skip(NOT_INSTALLED["cpp"])
    monkeypatch.setattr(cpp_mod, "_tried", True)
    monkeypatch.setattr(cpp_mod, "_lib", None)
    x, A, B, ids, w = make(40, 16, 12, 8, 4, 2)
    out = grouped_lora(x, A, B, ids, w, 1.0, impl="cpp")
    torch.testing.assert_close(out.double(), reference(x, A, B, ids, w, 1.0), rtol=1e-5, atol=1e-4)
    assert choose_impl(2048, 64, 16, 2) == "grouped" and choose_impl(2048, 8, 8, 2) == "dense"


def test_a_failed_cpp_build_fails_the_kernel_tests_unless_opted_out(monkeypatch, tmp_path, require_cpp):
    """A real failed build (a source that does not compile, built into an empty extension cache): the library falls
    back (load() is None, BUILD_ERROR says why), and the tests' gate turns that into a failure, not a skip, unless
    MOA_ALLOW_NO_CPP is set."""
    broken = tmp_path / "lora_cpu.cpp"
    broken.write_text('extern "C" int moa_lora_vector_bytes() { return not_declared; }\n')
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))  # the real cache stays untouched
    for name, value in (("SOURCE", broken), ("ENABLED", True), ("_tried", False), ("_lib", None),
                        ("BUILD_ERROR", None), ("BUILD_SECONDS", None)):
        monkeypatch.setattr(cpp_mod, name, value)
    assert cpp_mod.load() is None and "not_declared" in str(cpp_mod.BUILD_ERROR)

    def outcome():  # what pytest would report for a test gated on the kernel (a skip must not escape this test)
        try:
            require_cpp()
        except pytest.skip.Exception as skip:
            return "skipped", str(skip)
        except pytest.fail.Exception as failure:
            return "failed", str(failure)
        return "passed", ""

    for opt_out in (None, "", "0"):
        if opt_out is None:
            monkeypatch.delenv("MOA_ALLOW_NO_CPP", raising=False)
        else:
            monkeypatch.setenv("MOA_ALLOW_NO_CPP", opt_out)
        status, message = outcome()
        assert status == "failed" and "set MOA_ALLOW_NO_CPP=1" in message and "not_declared" in message
    monkeypatch.setenv("MOA_ALLOW_NO_CPP", "1")
    assert outcome()[0] == "skipped"
    monkeypatch.setattr(cpp_mod, "ENABLED", False)  # MOA_NO_CPP=1: turned off on purpose, a skip either way
    monkeypatch.delenv("MOA_ALLOW_NO_CPP")
    assert outcome() == ("skipped", "the C++ kernel is disabled (MOA_NO_CPP=1)")


@pytest.mark.parametrize("bad", ["-1", "E"])
def test_cpp_rejects_out_of_range_expert_ids(cpp, bad):
    """Plans built without validation (the router's top-k) reach the kernel unchecked: an id outside [0, E) is an
    error naming the id and the pool size, raised before any row is read by id or written (y0 of an in-place expand
    keeps its values). The backward reuses the forward's checked schedule."""
    E = 5
    x, A, B, ids, w = make(12, 16, 10, E, 4, 2, dtype=torch.float64)
    bad_id = -1 if bad == "-1" else E
    ids[7, 1] = bad_id
    plan = ExpertPlan(ids, E, validate=False)
    pattern = rf"expert id {bad_id} \(token 7, slot 1\) is out of range for a pool of {E} experts"
    with pytest.raises(UserError, match=pattern):
        grouped_lora(x.requires_grad_(), A, B, plan, w, 0.5, impl="cpp")
    y0 = torch.randn(12, 10, dtype=torch.float64)
    before = y0.clone()
    with pytest.raises(UserError, match=pattern):
        cpp_mod.cpp_expand(y0, x, A, B, plan, w, inplace=True)
    assert torch.equal(y0, before)


def test_no_cpp_env_var_disables_the_kernel():
    import os
    import subprocess
    import sys

    code = (
        "from moa.experts import IMPLS, choose_impl; from moa.experts.kernels import cpp;"
        "assert 'cpp' not in IMPLS and not cpp.available() and cpp.BUILD_ERROR is None;"
        "assert choose_impl(2048, 64, 16, 2) == 'grouped'"
    )
    env = {**os.environ, "MOA_NO_CPP": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_sparse_gate_backward_matches_gemms_and_thread_count(cpp, dtype):
    """The fused layer's sparse gate backward: the dense GEMMs' result, the same bits on 1 and 2 threads, and a
    decline (nothing written) when d_logits is dense."""
    from moa.experts.kernels.cpp import sparse_gate_backward

    gen = torch.Generator().manual_seed(11)
    n, E, d, k = 301, 24, 70, 2
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    gate_w = torch.randn(E, d, generator=gen, dtype=dtype)
    ids = torch.randn(n, E, generator=gen).topk(k).indices
    dl = torch.zeros(n, E, dtype=dtype).scatter_(1, ids, torch.randn(n, k, generator=gen, dtype=dtype))
    dx0 = torch.randn(n, d, generator=gen, dtype=dtype)
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            dx = dx0.clone()
            done, dwg = sparse_gate_backward(dl, x, gate_w, dx, True)
            assert done
            results.append((dx, dwg))
            done, _ = sparse_gate_backward(torch.randn(n, E, generator=gen, dtype=dtype), x, gate_w, dx.clone(), True)
            assert not done
    finally:
        torch.set_num_threads(threads)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(results[0][0], dx0 + dl @ gate_w, **tol)
    torch.testing.assert_close(results[0][1], dl.t() @ x, **tol)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
