"""``triton``: one fused Triton kernel for the forward pass, grouped GEMMs for the backward.

Rows are the ``P = N * k`` (token, expert) pairs sorted by expert (the ragged layout of :class:`ExpertPlan`:
``plan.order``, ``plan.counts``, ``plan.offsets``; never the padded one). A block schedule built on the device
(no host sync) cuts every expert's rows into blocks of ``BLOCK_M``; the grid is the upper bound
``cdiv(P, BLOCK_M) + E`` and programs past the last block exit at once (vLLM's trick: the grid depends only on
shapes). One program, for one block of one expert ``e``::

    pair = order[rows]; tok = pair // k; w = weights[pair]
    h    = sum over d_in tiles of x[tok, K-tile] @ A_e[:, K-tile]^T      # [BLOCK_M, R] fp32, stays in registers
    for each d_out tile:  Y_pairs[pair, N-tile] = (h * w) @ B_e[N-tile]^T

``R`` is ``r`` padded to a power of two >= 16 (masked). ``A [E, r, d_in]`` and ``B [E, d_out, r]`` are indexed through
their strides (they are views of the packed pool weights; no pointer tables), so the kernel also runs under the
Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors). The combine is either deterministic (``Y_pairs
[P, d_out]``, then ``.view(N, k, d_out).sum(1)``) or atomic (``tl.atomic_add`` into an fp32 ``[N, d_out]``; faster, no
fixed order): atomic on CUDA unless ``torch.use_deterministic_algorithms(True)``, deterministic elsewhere. The launch
is the torch op ``moa::lora_fused`` (``torch.library.custom_op`` with a fake implementation, so ``torch.compile``
treats it as one call of known output shape; no host sync, grid fixed by the shapes: capturable in a CUDA graph).

Dot precision: fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set (as torch's own
matmuls do); fp64 inputs accumulate in fp64. fp16/bf16 inputs on a GPU dot in their own dtype with fp32 accumulation
(``h`` is rounded to the input dtype before the expand, as the ``grouped`` impl does); the interpreter cannot dot
bf16 (triton #11584), so there bf16 tiles are cast to fp32 first.

The backward (a ``torch.autograd.Function``): ``dX`` is the same fused kernel run on ``grad_out`` with the factors
swapped (``B^T`` as the shrink, ``A^T`` as the expand: strided views, no copies); ``dA``, ``dB`` and the routing-weight
gradient are the ``grouped`` implementation's grouped GEMMs (:func:`.grouped.grouped_backward`; ``grouped_mm`` on
CUDA), fed with ``h`` per pair saved by the forward kernel in fp32 (``P * r`` values; fp64 for fp64 inputs).
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import UserError
from .grouped import combine_index_add, grouped_backward, row_weights
from .plan import ExpertPlan

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

AVAILABLE = triton is not None

# Default tiles (powers of two, >= 16 for tl.dot). Untuned: a reasonable start for the prefill/training schedule.
BLOCK_M = 64
BLOCK_K = 64
BLOCK_N = 64


if AVAILABLE:

    @triton.jit
    def _lora_fwd_kernel(
        X, A, B, W, ORDER, BLK_EXPERT, BLK_START, BLK_END, Y, H,
        d_in, d_out, r, top_k,
        stride_xn, stride_xk,
        stride_ae, stride_ar, stride_ak,
        stride_be, stride_bn, stride_br,
        stride_yp, stride_yn,
        stride_hp,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, SAVE_H: tl.constexpr,
        ATOMIC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row_start = tl.load(BLK_START + pid)
        row_end = tl.load(BLK_END + pid)
        if row_start >= row_end:  # past the last block of the schedule (or an empty one)
            return
        e = tl.load(BLK_EXPERT + pid).to(tl.int64)

        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        pair = tl.load(ORDER + rows, mask=row_mask, other=0).to(tl.int64)
        tok = pair // top_k
        w = tl.load(W + pair, mask=row_mask, other=0.0).to(ACC)

        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < r
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N)

        # shrink: h[BLOCK_M, R] = x[tok] @ A_e^T over d_in tiles, accumulated in ACC (fp32; fp64 for fp64 inputs)
        x_ptrs = X + tok[:, None] * stride_xn + offs_k[None, :] * stride_xk
        a_ptrs = A + e * stride_ae + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        for k0 in range(0, d_in, BLOCK_K):
            k_mask = (k0 + offs_k) < d_in
            xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
            if UPCAST:
                h += tl.dot(xt.to(ACC), at.to(ACC), input_precision=PRECISION)
            else:
                h += tl.dot(xt, at)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak

        if SAVE_H:  # unscaled h of each sorted row, for the backward
            h_ptrs = H + rows[:, None] * stride_hp + offs_r[None, :]
            tl.store(h_ptrs, h, mask=row_mask[:, None] & r_mask[None, :])

        hw = h * w[:, None]
        if not UPCAST:
            hw = hw.to(B.dtype.element_ty)

        # expand: Y[pair or token, N-tile] (+)= hw @ B_e[N-tile]^T
        b_ptrs = B + e * stride_be + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
        y_row = tok if ATOMIC else pair
        y_ptrs = Y + y_row[:, None] * stride_yp + offs_n[None, :] * stride_yn
        for n0 in range(0, d_out, BLOCK_N):
            n_mask = (n0 + offs_n) < d_out
            bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
            if UPCAST:
                o = tl.dot(hw, bt.to(ACC), input_precision=PRECISION)
            else:
                o = tl.dot(hw, bt)
            if ATOMIC:  # Y is [N, d_out] in the accumulator dtype; the k pairs of a token race here
                tl.atomic_add(y_ptrs, o.to(Y.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
            else:
                tl.store(y_ptrs, o.to(Y.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
            b_ptrs += BLOCK_N * stride_bn
            y_ptrs += BLOCK_N * stride_yn

    INTERPRETED = type(_lora_fwd_kernel).__name__ == "InterpretedFunction"
else:
    INTERPRETED = False


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def can_run(device: torch.device | str) -> bool:
    """Whether the Triton kernel can run on tensors of this device (CUDA, or the CPU under the interpreter)."""
    kind = torch.device(device).type
    return AVAILABLE and (kind == "cuda" or (kind == "cpu" and INTERPRETED))


def _check_runnable(x: Tensor) -> None:
    if not AVAILABLE:
        raise RuntimeError("grouped_lora impl 'triton' needs the triton package (pip install triton)")
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "grouped_lora impl 'triton' got CPU tensors: move the tensors to a CUDA device, or run the Triton "
            "interpreter by setting TRITON_INTERPRET=1 in the environment before triton is imported "
            f"(TRITON_INTERPRET is now {os.environ.get('TRITON_INTERPRET')!r}; "
            "it was not 1 when this module imported triton)"
        )
    if not can_run(x.device):
        raise RuntimeError(
            f"grouped_lora impl 'triton' supports CUDA tensors (or CPU ones with TRITON_INTERPRET=1), got {x.device}"
        )


# Block schedule per (plan, BLOCK_M): plans are shared by every layer of a forward pass, so is their schedule.
_SCHEDULES: "weakref.WeakKeyDictionary[ExpertPlan, dict[int, tuple[Tensor, Tensor, Tensor]]]"
_SCHEDULES = weakref.WeakKeyDictionary()


def block_schedule(plan: ExpertPlan, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(expert, row_start, row_end)`` int32 of each program, grid ``cdiv(P, block_m) + E``, built on the device.

    Expert ``e`` owns rows ``[offsets[e] - counts[e], offsets[e])`` of the sorted layout and ``cdiv(counts[e],
    block_m)`` blocks; programs past the last block get ``row_start == row_end`` (empty, they exit at once).
    """
    per_plan = _SCHEDULES.setdefault(plan, {})
    if block_m in per_plan:
        return per_plan[block_m]
    E = plan.n_experts
    grid = -(-plan.n_pairs // block_m) + E
    counts = plan.counts
    ends = plan.offsets.long()
    starts = ends - counts
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    pid = torch.arange(grid, device=counts.device)
    expert = torch.searchsorted(block_end, pid, right=True)
    valid = expert < E
    expert = expert.clamp_(max=E - 1)
    first_block = block_end.index_select(0, expert) - blocks.index_select(0, expert)
    row_start = starts.index_select(0, expert) + (pid - first_block) * block_m
    row_end = torch.minimum(row_start + block_m, ends.index_select(0, expert))
    row_start = torch.where(valid, row_start, 0)
    row_end = torch.where(valid, row_end, 0)
    sched = (expert.to(torch.int32), row_start.to(torch.int32), row_end.to(torch.int32))
    per_plan[block_m] = sched
    return sched


def _launch(
    x: Tensor, A: Tensor, B: Tensor, w: Tensor, order: Tensor, expert: Tensor, row_start: Tensor, row_end: Tensor,
    top_k: int, save_h: bool, atomic: bool, block_m: int, block_k: int, block_n: int,
) -> tuple[Tensor, Tensor]:
    """Run the fused kernel: ``([N, d_out] output, [P, r] h of each sorted row, or an empty tensor)``."""
    N, d_in = x.shape
    E, r, _ = A.shape
    d_out = B.shape[1]
    P = order.numel()
    fp64 = x.dtype == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    if atomic:  # the k pairs of a token add into one fp32 (fp64) row
        y = torch.zeros(N, d_out, device=x.device, dtype=acc_dtype)
    else:  # one row per pair, summed over k afterwards: deterministic
        y = torch.empty(P, d_out, device=x.device, dtype=x.dtype)
    h = torch.empty(P if save_h else 0, r, device=x.device, dtype=acc_dtype)

    half = (torch.float16, torch.bfloat16)
    native = x.dtype in half and A.dtype == x.dtype and B.dtype == x.dtype
    if INTERPRETED and x.dtype == torch.bfloat16:
        native = False  # the interpreter's tl.dot is wrong on bf16 (triton #11584)
    tf32 = x.dtype == torch.float32 and x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    grid = (row_start.numel(),)
    _lora_fwd_kernel[grid](
        x, A, B, w, order, expert, row_start, row_end, y, h if save_h else y,
        d_in, d_out, r, top_k,
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        y.stride(0), y.stride(1),
        h.stride(0) if save_h else 0,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=max(16, _next_pow2(r)),
        UPCAST=not native, ACC=tl.float64 if fp64 else tl.float32, PRECISION="tf32" if tf32 else "ieee",
        SAVE_H=save_h, ATOMIC=atomic,
    )
    out = y.to(x.dtype) if atomic else y.view(N, top_k, d_out).sum(1)
    return out, h


if AVAILABLE:
    # The kernel as a torch op, so torch.compile sees one opaque call with known output shapes (the fake below)
    # instead of tracing into the launcher.
    @torch.library.custom_op("moa::lora_fused", mutates_args=())
    def lora_fused(
        x: Tensor, A: Tensor, B: Tensor, w: Tensor, order: Tensor, expert: Tensor, row_start: Tensor,
        row_end: Tensor, top_k: int, save_h: bool, atomic: bool, block_m: int, block_k: int, block_n: int,
    ) -> tuple[Tensor, Tensor]:
        return _launch(x, A, B, w, order, expert, row_start, row_end, top_k, save_h, atomic, block_m, block_k, block_n)

    @lora_fused.register_fake
    def _(x, A, B, w, order, expert, row_start, row_end, top_k, save_h, atomic, block_m, block_k, block_n):
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = x.new_empty(x.shape[0], B.shape[1])
        h = x.new_empty(order.shape[0] if save_h else 0, A.shape[1], dtype=acc_dtype)
        return out, h


def deterministic_combine(device: torch.device) -> bool:
    """Atomic adds combine the k pairs of a token fastest on a GPU but in no fixed order; torch's switch
    ``torch.use_deterministic_algorithms(True)`` selects the deterministic per-pair buffer instead."""
    return torch.are_deterministic_algorithms_enabled() or device.type != "cuda"


def lora_triton_forward(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    plan: ExpertPlan,
    weights: Tensor,
    *,
    save_h: bool = False,
    atomic: bool | None = None,
    block_m: int = BLOCK_M,
    block_k: int = BLOCK_K,
    block_n: int = BLOCK_N,
) -> tuple[Tensor, Tensor | None]:
    """The fused forward kernel alone: ``([N, d_out] output, [P, r] h of each sorted row or None)``.

    ``h`` (unscaled ``x @ A_e^T``) is fp32, fp64 for fp64 inputs. ``atomic=None`` follows
    :func:`deterministic_combine`.
    """
    _check_runnable(x)
    for name, blk in (("block_m", block_m), ("block_k", block_k), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise UserError(f"{name} must be a power of two >= 16, got {blk}")
    if atomic is None:
        atomic = not deterministic_combine(x.device)
    expert, row_start, row_end = block_schedule(plan, block_m)
    out, h = torch.ops.moa.lora_fused(
        x, A, B, weights.contiguous().view(-1), plan.order.contiguous(), expert, row_start, row_end,
        plan.top_k, save_h, atomic, block_m, block_k, block_n,
    )
    return out, (h if save_h else None)


class _TritonLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, weights, plan: ExpertPlan, blocks: tuple[int, int, int], grad_enabled: bool):
        need_grad = grad_enabled and any(ctx.needs_input_grad[:4])
        out, h = lora_triton_forward(
            x, A, B, plan, weights, save_h=need_grad, block_m=blocks[0], block_k=blocks[1], block_n=blocks[2]
        )
        if need_grad:
            ctx.save_for_backward(x, A, B, weights, h)
            ctx.plan, ctx.blocks = plan, blocks
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, A, B, weights, h_sorted = ctx.saved_tensors
        plan, dtype = ctx.plan, x.dtype
        need_x, need_a, need_b, need_w = ctx.needs_input_grad[:4]
        grad_out = grad_out.to(dtype).contiguous()
        grad_x = grad_a = grad_b = grad_w = None
        if need_x:  # dX = sum_j w_j A_e^T (B_e^T g): the forward kernel on g with the factors swapped
            block_m, block_k, block_n = ctx.blocks
            grad_x, _ = lora_triton_forward(
                grad_out, B.to(dtype).transpose(1, 2), A.to(dtype).transpose(1, 2), plan, weights.to(dtype),
                block_m=block_m, block_k=block_n, block_n=block_k,
            )
        if need_a or need_b or need_w:  # dA, dB and dW: grouped GEMMs over the expert-sorted rows
            h = h_sorted.to(dtype)  # the kernel's rows are the ragged expert-sorted pairs
            if plan.padded:  # a CPU plan (interpreter) may use the padded layout: put h where the grouped rows are
                h = h.new_zeros(plan.n_experts * plan.capacity, h.shape[1]).index_copy_(0, plan.padded_destination, h)
            _, grad_a, grad_b, grad_w = grouped_backward(
                grad_out, x.index_select(0, plan.row_token), A.to(dtype), B.to(dtype), h,
                row_weights(weights.to(dtype), plan), plan, combine_index_add,
                (False, need_a, need_b, need_w),
            )
        grad_a = grad_a.to(A.dtype) if grad_a is not None else None
        grad_b = grad_b.to(B.dtype) if grad_b is not None else None
        grad_w = grad_w.to(weights.dtype) if grad_w is not None else None
        return grad_x, grad_a, grad_b, grad_w, None, None, None


def lora_triton(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    plan: ExpertPlan,
    weights: Tensor,
    *,
    block_m: int = BLOCK_M,
    block_k: int = BLOCK_K,
    block_n: int = BLOCK_N,
) -> Tensor:
    """x: [N, d_in], A: [E, r, d_in], B: [E, d_out, r], weights: [N, k] (scaling folded in)."""
    for name, t in (("A", A), ("B", B), ("weights", weights)):
        if t.device != x.device:
            raise UserError(f"impl 'triton': {name} is on {t.device} but x is on {x.device}")
    if plan.expert_ids.device != x.device:
        raise UserError(f"impl 'triton': the routing plan is on {plan.expert_ids.device} but x is on {x.device}")
    return _TritonLoRA.apply(x, A, B, weights, plan, (block_m, block_k, block_n), torch.is_grad_enabled())
