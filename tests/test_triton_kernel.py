"""The ``triton`` grouped expert LoRA kernel, run on CPU tensors through the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, and this pytest process has imported it already
(``moa.experts`` does), so the kernel checks run in one subprocess with the interpreter on: it runs every case,
prints one JSON line per case, and each test below asserts on its case. The interpreter runs programs one after
another, so shapes stay tiny. Block schedule and error paths are checked in-process (no kernel launch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from moa.experts import IMPLS, ExpertPlan, choose_impl, grouped_lora  # noqa: E402
from moa.experts.kernels import triton_lora  # noqa: E402

# Runs under TRITON_INTERPRET=1. Each case is a function; failures are recorded, not raised, so one subprocess
# reports every case.
SCRIPT = textwrap.dedent(
    r'''
    import json, sys, time, traceback
    import torch
    from moa.experts import IMPLS, ExpertPlan, choose_impl, grouped_lora
    from moa.experts.kernels import triton_lora as T

    torch.set_num_threads(1)
    CASES = {}

    def case(name):
        def deco(fn):
            CASES[name] = fn
            return fn
        return deco

    def make(N, d_in, d_out, E, r, k, dtype=torch.float32, seed=0, skew=None):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N, d_in, generator=g)
        A = torch.randn(E, r, d_in, generator=g)
        B = torch.randn(E, d_out, r, generator=g)
        logits = torch.randn(N, E, generator=g)
        if skew is not None:
            logits[:, skew] += 100.0
        w, ids = logits.softmax(-1).topk(k)
        return x.to(dtype), A.to(dtype), B.to(dtype), ids, w.to(dtype)

    def reference(x, A, B, ids, w, scaling):
        x, A, B, w = (t.double() for t in (x, A, B, w))
        lead = x.shape[:-1]
        x2, ids2, w2 = x.reshape(-1, x.shape[-1]), ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1])
        out = torch.einsum("nk,nkor,nkri,ni->no", w2 * scaling, B[ids2], A[ids2], x2)
        return out.reshape(*lead, B.shape[1])

    # fp32: elementwise. Half: relative Frobenius-norm error against fp64 on the same rounded inputs (the grouped
    # impls measure ~4e-4 fp16, ~3.5e-3 bf16); a 4 % scale error fails these bounds by an order of magnitude.
    HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

    def rel_err(got, want):
        return float((got.double() - want).norm() / want.norm())

    def check_forward(shape, dtype=torch.float32, blocks=(64, 64, 64), skew=None, scaling=0.5):
        x, A, B, ids, w = make(*shape, dtype=dtype, skew=skew)
        plan = ExpertPlan(ids, shape[3])
        out = T.lora_triton(x, A, B, plan, w * scaling, block_m=blocks[0], block_k=blocks[1], block_n=blocks[2])
        assert out.dtype == dtype and out.shape == (shape[0], shape[2]), (out.dtype, out.shape)
        ref = reference(x, A, B, ids, w, scaling)
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        else:
            assert rel_err(out, ref) < HALF_TOL[dtype], (dtype, rel_err(out, ref))

    # N, d_in, d_out, E, r, k
    FWD_SHAPES = {
        "ragged": (37, 40, 24, 5, 6, 2),   # r = 6 (not a power of two), d = 40 (not a tile multiple), N*k = 74
        "k1": (64, 32, 48, 8, 8, 1),       # k = 1
        "tiny": (3, 16, 12, 6, 4, 2),      # N*k = 6 < BLOCK_M, most experts empty
        "r24_k3": (20, 24, 20, 4, 24, 3),  # r = 24 -> R = 32
        "wide": (48, 64, 64, 4, 16, 2),    # several blocks per expert with BLOCK_M = 16
    }
    BLOCKS = {"b64": (64, 64, 64), "b16": (16, 16, 16), "mixed": (32, 16, 32)}

    for sname, shape in FWD_SHAPES.items():
        for bname, blocks in BLOCKS.items():
            case(f"fwd_fp32_{sname}_{bname}")(lambda shape=shape, blocks=blocks: check_forward(shape, blocks=blocks))
        for dtype in (torch.float16, torch.bfloat16):
            name = f"fwd_{str(dtype)[6:]}_{sname}"
            case(name)(lambda shape=shape, dtype=dtype: check_forward(shape, dtype=dtype, blocks=(16, 32, 16)))

    @case("fwd_all_tokens_on_one_expert")
    def _():
        for blocks in ((16, 16, 16), (64, 64, 64)):
            x, A, B, ids, w = make(30, 16, 16, 5, 4, 1, skew=2)
            assert (ids == 2).all()
            check_forward((30, 16, 16, 5, 4, 1), skew=2, blocks=blocks)
            check_forward((30, 16, 16, 5, 4, 1), dtype=torch.float16, skew=2, blocks=blocks)

    @case("fwd_3d_through_grouped_lora")
    def _():
        x, A, B, ids, w = make(2 * 7, 16, 12, 4, 4, 2)
        out = grouped_lora(x.view(2, 7, 16), A, B, ids.view(2, 7, 2), w.view(2, 7, 2), 1.5, impl="triton")
        assert out.shape == (2, 7, 12)
        torch.testing.assert_close(out.reshape(14, 12).double(), reference(x, A, B, ids, w, 1.5), rtol=1e-5, atol=1e-4)

    @case("fwd_packed_pool_views")
    def _():
        # A and B as the LoRAPool views of the packed weights (B is a non-contiguous permute)
        E, r, d_in, d_out = 4, 6, 24, 20
        g = torch.Generator().manual_seed(5)
        lora_A, lora_B = torch.randn(E * r, d_in, generator=g), torch.randn(d_out, E * r, generator=g)
        A, B = lora_A.view(E, r, d_in), lora_B.view(d_out, E, r).permute(1, 0, 2)
        assert not B.is_contiguous()
        x = torch.randn(25, d_in, generator=g)
        w, ids = torch.randn(25, E, generator=g).softmax(-1).topk(2)
        out = grouped_lora(x, A, B, ids, w, 2.0, impl="triton")
        torch.testing.assert_close(out.double(), reference(x, A, B, ids, w, 2.0), rtol=1e-5, atol=1e-4)

    @case("fwd_dense_soft_routing")
    def _():
        x, A, B, _, _ = make(20, 16, 8, 4, 4, 2)
        gate = torch.randn(20, 4).softmax(-1)
        out = grouped_lora(x, A, B, None, gate, 0.5, impl="triton")
        ids = torch.arange(4).expand(20, 4)
        torch.testing.assert_close(out.double(), reference(x, A, B, ids, gate, 0.5), rtol=1e-5, atol=1e-4)

    @case("fwd_plan_reused_across_calls")
    def _():
        x, A, B, ids, w = make(40, 16, 16, 4, 4, 2)
        plan = ExpertPlan(ids, 4)
        out1 = grouped_lora(x, A, B, plan, w, 1.0, impl="triton")
        out2 = grouped_lora(x * 2, A, B, plan, w, 1.0, impl="triton")
        torch.testing.assert_close(out2, 2 * out1)

    @case("fwd_under_no_grad")
    def _():
        x, A, B, ids, w = make(37, 40, 24, 5, 6, 2)
        A.requires_grad_()
        with torch.no_grad():
            out = grouped_lora(x, A, B, ids, w, 0.5, impl="triton")
        assert not out.requires_grad
        torch.testing.assert_close(out.double(), reference(x, A, B, ids, w, 0.5), rtol=1e-5, atol=1e-4)

    def check_grads(shape, skew=None, requires=(True, True, True, True), blocks=(16, 16, 16), three_d=False):
        x, A, B, ids, w = make(*shape, skew=skew)
        g = torch.Generator().manual_seed(7)
        grad_out = torch.randn(shape[0], shape[2], generator=g)
        results = {}
        for impl in ("loop", "triton"):
            leaves = [t.clone().requires_grad_(req) for t, req in zip((x, A, B, w), requires)]
            lx, lA, lB, lw = leaves
            if impl == "triton" and not three_d:
                out = T.lora_triton(lx, lA, lB, ExpertPlan(ids, shape[3]), lw * 0.7,
                                    block_m=blocks[0], block_k=blocks[1], block_n=blocks[2])
            elif three_d:
                n = shape[0]
                out = grouped_lora(lx.view(1, n, -1), lA, lB, ids.view(1, n, -1), lw.view(1, n, -1), 0.7, impl=impl)
                out = out.view(n, -1)
            else:
                out = grouped_lora(lx, lA, lB, ids, lw, 0.7, impl=impl)
            out.backward(grad_out)
            results[impl] = [out] + [t.grad for t in leaves]
        for i, (got, want) in enumerate(zip(results["triton"], results["loop"])):
            if want is None:
                assert got is None, i
                continue
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"output/grad #{i}: {m}")
        return results["triton"]

    @case("grad_ragged")
    def _():
        check_grads((37, 40, 24, 5, 6, 2))
        check_grads((37, 40, 24, 5, 6, 2), blocks=(64, 64, 64))

    @case("grad_k1_and_r24")
    def _():
        check_grads((32, 32, 48, 8, 8, 1))
        check_grads((20, 24, 20, 4, 24, 3))

    @case("grad_tiny")
    def _():
        check_grads((3, 16, 12, 6, 4, 2))

    @case("grad_only_lora_weights")
    def _():
        check_grads((37, 40, 24, 5, 6, 2), requires=(False, True, True, False))
        check_grads((37, 40, 24, 5, 6, 2), requires=(True, False, False, True))

    @case("grad_3d_through_grouped_lora")
    def _():
        check_grads((14, 16, 12, 4, 4, 2), three_d=True)

    @case("grad_expert_without_tokens")
    def _():
        _, _, gA, gB, _ = check_grads((30, 16, 16, 5, 4, 1), skew=2)
        for grad in (gA, gB):
            assert torch.count_nonzero(grad[[0, 1, 3, 4]]) == 0
            assert torch.count_nonzero(grad[2]) > 0

    @case("grad_padded_cpu_plan")
    def _():
        # balanced routing: the CPU plan picks the padded layout; the kernel and its backward stay ragged
        ids = torch.arange(64).remainder(8).view(32, 2)
        assert ExpertPlan(ids, 8).padded
        g = torch.Generator().manual_seed(9)
        x, A, B = (torch.randn(*s, generator=g) for s in ((32, 16), (8, 4, 16), (8, 12, 4)))
        w = torch.rand(32, 2, generator=g)
        grads = {}
        for impl in ("loop", "triton"):
            leaves = [t.clone().requires_grad_() for t in (x, A, B, w)]
            out = grouped_lora(*leaves[:3], ExpertPlan(ids, 8), leaves[3], 1.0, impl=impl)
            out.backward(torch.ones_like(out))
            grads[impl] = [out] + [t.grad for t in leaves]
        for got, want in zip(grads["triton"], grads["loop"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    @case("gradcheck_fp64")
    def _():
        # fp64 inputs accumulate in fp64 in the kernel; fast_mode keeps the interpreter's forward calls few
        x, A, B, ids, w = make(11, 8, 6, 4, 3, 2, dtype=torch.float64)
        fn = lambda x, A, B, w: grouped_lora(x, A, B, ids, w, 0.7, impl="triton")
        assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (x, A, B, w)], fast_mode=True)
        g = torch.Generator().manual_seed(1)
        shapes = ((9, 8), (3, 2, 8), (3, 5, 2))
        x, A, B = (torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes)
        gate = torch.randn(9, 3, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
        fn = lambda x, A, B, gate: grouped_lora(x, A, B, None, gate, 1.3, impl="triton")  # soft routing
        assert torch.autograd.gradcheck(fn, [x, A, B, gate], fast_mode=True)

    @case("fwd_atomic_combine")
    def _():
        # the atomic combine (CUDA's default) and the deterministic one agree with the fp64 reference
        for dtype, tol in ((torch.float32, 1e-6), (torch.float16, HALF_TOL[torch.float16])):
            x, A, B, ids, w = make(37, 24, 20, 6, 4, 3, dtype=dtype, skew=1)
            want = reference(x, A, B, ids, w, 1.0)
            for atomic in (True, False):
                out, _ = T.lora_triton_forward(x, A, B, ExpertPlan(ids, 6), w, atomic=atomic, block_m=16)
                assert out.dtype == dtype and rel_err(out, want) < tol, (dtype, atomic, rel_err(out, want))

    @case("empty_input")
    def _():
        # N = 0 tokens: an empty result of the right shape; backward gives empty / zero gradients
        x, A, B, ids, w = make(5, 16, 12, 4, 4, 2)
        for lead in ((0,), (2, 0)):
            leaves = [x.new_zeros(*lead, 16), A.clone(), B.clone(), w.new_zeros(*lead, 2)]
            leaves = [t.requires_grad_() for t in leaves]
            out = grouped_lora(*leaves[:3], ids.new_zeros(*lead, 2), leaves[3], 1.0, impl="triton")
            assert out.shape == (*lead, 12), out.shape
            out.sum().backward()
            assert leaves[0].grad.shape == leaves[0].shape and leaves[3].grad.shape == leaves[3].shape
            assert torch.count_nonzero(leaves[1].grad) == 0 and torch.count_nonzero(leaves[2].grad) == 0

    @case("compile_fused_op_fullgraph")
    def _():
        # the launch is one custom op with a fake: torch.compile traces it without a graph break
        x, A, B, ids, w = make(19, 16, 12, 4, 4, 2)
        plan = ExpertPlan(ids, 4)
        expert, start, end = T.block_schedule(plan, 16)
        order = plan.order.contiguous()
        fn = lambda x, A, B, w: torch.ops.moa.lora_fused(x, A, B, w.view(-1), order, expert, start, end, 2, True, False, 16, 16, 16)
        torch._dynamo.reset()
        out, h = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, A, B, w)
        want, want_h = fn(x, A, B, w)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(h, want_h)
        assert h.shape == (plan.n_pairs, 4)

    @case("compile_forward_backward")
    def _():
        x, A, B, ids, w = make(21, 16, 12, 5, 4, 2)
        def run(f):
            leaves = [t.clone().requires_grad_() for t in (x, A, B, w)]
            out = f(*leaves)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            return [out.detach()] + [t.grad for t in leaves]
        fn = lambda x, A, B, w: grouped_lora(x, A, B, ids, w, 0.5, impl="triton")
        torch._dynamo.reset()
        got, want = run(torch.compile(fn, backend="aot_eager")), run(fn)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)

    @case("interpreter_registration_and_auto")
    def _():
        assert T.INTERPRETED and "triton" in IMPLS, (T.INTERPRETED, sorted(IMPLS))
        assert choose_impl(2048, 64, 16, 2, "cuda") == "triton"
        assert choose_impl(2048, 64, 16, 2) in ("grouped", "cpp")  # CPU tensors: auto never picks the interpreter
        assert choose_impl(2048, 8, 16, 2, "cuda") == "dense"  # E*r = 128
        assert choose_impl(2048, 64, 16, None, "cuda") == "dense"  # soft routing
        assert choose_impl(4, 64, 16, 2, "cuda") == "dense"  # decode

    only = set(sys.argv[1:])
    for name, fn in CASES.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            fn()
            res = {"ok": True}
        except Exception:
            res = {"ok": False, "error": traceback.format_exc(limit=4)[-3000:]}
        res["seconds"] = round(time.perf_counter() - t0, 3)
        print("CASE " + json.dumps({"name": name, **res}), flush=True)
    '''
)

FWD_SHAPES = ["ragged", "k1", "tiny", "r24_k3", "wide"]
CASE_NAMES = (
    [f"fwd_fp32_{s}_{b}" for s in FWD_SHAPES for b in ("b64", "b16", "mixed")]
    + [f"fwd_{d}_{s}" for s in FWD_SHAPES for d in ("float16", "bfloat16")]
    + [
        "fwd_all_tokens_on_one_expert",
        "fwd_3d_through_grouped_lora",
        "fwd_packed_pool_views",
        "fwd_dense_soft_routing",
        "fwd_plan_reused_across_calls",
        "fwd_under_no_grad",
        "fwd_atomic_combine",
        "empty_input",
        "compile_fused_op_fullgraph",
        "compile_forward_backward",
        "grad_ragged",
        "grad_k1_and_r24",
        "grad_tiny",
        "grad_only_lora_weights",
        "grad_3d_through_grouped_lora",
        "grad_expert_without_tokens",
        "grad_padded_cpu_plan",
        "gradcheck_fp64",
        "interpreter_registration_and_auto",
    ]
)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    script = tmp_path_factory.mktemp("triton_interp") / "run_cases.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            res = json.loads(line[5:])
            results[res.pop("name")] = res
    if proc.returncode != 0 or not results:
        pytest.fail(
            f"interpreter subprocess exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return results


@pytest.mark.parametrize("name", CASE_NAMES)
def test_triton_kernel_under_interpreter(interpreter_results, name):
    assert name in interpreter_results, f"case {name!r} did not run; ran {sorted(interpreter_results)}"
    res = interpreter_results[name]
    assert res["ok"], res.get("error")


def test_every_case_is_listed(interpreter_results):
    assert set(interpreter_results) == set(CASE_NAMES)


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("skew", [None, 2])
def test_block_schedule_covers_every_row_once(block_m, skew):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(45, 6, generator=g)
    if skew is not None:
        logits[:, skew] += 100.0
    ids = logits.topk(2).indices
    plan = ExpertPlan(ids, 6)
    expert, start, end = triton_lora.block_schedule(plan, block_m)
    P, E = plan.n_pairs, plan.n_experts
    assert expert.numel() == -(-P // block_m) + E  # grid: shape-only upper bound
    assert expert.dtype == start.dtype == end.dtype == torch.int32
    covered = torch.zeros(P, dtype=torch.long)
    ends = plan.offsets.long()
    for e, s, t in zip(expert.tolist(), start.tolist(), end.tolist()):
        if s >= t:
            continue  # empty program
        assert t - s <= block_m
        assert int(ends[e] - plan.counts[e]) <= s and t <= int(ends[e])  # inside its expert's rows
        covered[s:t] += 1
    assert (covered == 1).all()
    sorted_experts = plan.expert_ids.reshape(-1)[plan.order]
    for e, s, t in zip(expert.tolist(), start.tolist(), end.tolist()):
        assert (sorted_experts[s:t] == e).all()
    assert triton_lora.block_schedule(plan, block_m)[0] is expert  # cached per plan


@pytest.mark.skipif(triton_lora.INTERPRETED, reason="this process runs the Triton interpreter")
def test_cpu_tensors_without_interpreter_raise_a_clear_error():
    x, A, B = torch.randn(4, 8), torch.randn(3, 2, 8), torch.randn(3, 5, 2)
    ids, w = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]]), torch.rand(4, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_lora.lora_triton(x, A, B, ExpertPlan(ids, 3), w)
    assert not triton_lora.can_run("cpu")
    if "triton" not in IMPLS:  # no CUDA here: not registered, and asking for it says why
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            grouped_lora(x, A, B, ids, w, impl="triton")
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            grouped_lora(x, A, B, ids, w, impl="triton")


def test_auto_prefers_triton_only_for_cuda_tensors():
    assert choose_impl(2048, 64, 16, 2) in ("grouped", "cpp")  # cpp: the C++ CPU kernel, when it built
    assert choose_impl(2048, 64, 16, 2, "cpu") in ("grouped", "cpp")
    expected = "triton" if "triton" in IMPLS else "grouped"
    assert choose_impl(2048, 64, 16, 2, "cuda") == expected
    assert choose_impl(2048, 8, 16, 2, "cuda") == "dense"
    assert choose_impl(2048, 64, 16, None, "cuda") == "dense"


def test_combine_follows_torch_determinism_switch():
    assert triton_lora.deterministic_combine(torch.device("cpu"))
    assert not triton_lora.deterministic_combine(torch.device("cuda"))
    torch.use_deterministic_algorithms(True)
    try:
        assert triton_lora.deterministic_combine(torch.device("cuda"))
    finally:
        torch.use_deterministic_algorithms(False)
