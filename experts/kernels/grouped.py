"""``grouped``: sort (token, expert) pairs by expert, grouped GEMMs, weighted combine.

Forward, with ``P = N * k`` pairs sorted by expert (``plan.order``) and ``tok`` the token of each pair::

    xs = x[tok]                       # [P, d_in]   gather
    h  = grouped_mm(xs, A^T, offs)    # [P, r]      shrink, one GEMM per expert group
    o  = grouped_mm(h * w, B^T, offs) # [P, d_out]  expand
    y  = combine(o)                   # [N, d_out]  embedding_bag over each token's k rows (or torch-scatter)

The backward is written out (a ``torch.autograd.Function``) so every gradient is itself a grouped GEMM:
``dA`` and ``dB`` are 2D x 2D grouped GEMMs with a ragged contraction, ``dx`` reuses the gather/combine.
Layouts: on the CPU, when routing is balanced enough, pairs are padded to ``[E, capacity]`` and every grouped GEMM
is one ``bmm`` (faster there than ``grouped_mm``'s per-group loop); otherwise the ragged sorted layout uses
``torch.nn.functional.grouped_mm`` where it applies (fp32/bf16/fp16, 16-byte aligned strides) and else a loop over
the sorted segments (one host sync per plan, not one per expert).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .plan import ExpertPlan

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def _use_grouped_mm(a: Tensor, b: Tensor) -> bool:
    return (
        _GROUPED_MM is not None
        and a.dtype in _GROUPED_MM_DTYPES
        and a.dtype == b.dtype
        and _aligned(a)
        and _aligned(b)
    )


def gmm(a: Tensor, b: Tensor, plan: ExpertPlan) -> Tensor:
    """Rows of ``a`` (in the plan's layout) times ``b[E, K, M]`` of their expert: ``[rows, M]``."""
    if plan.padded:
        return torch.bmm(a.view(plan.n_experts, plan.capacity, a.shape[1]), b).view(a.shape[0], b.shape[2])
    if _use_grouped_mm(a, b):
        return _GROUPED_MM(a, b, offs=plan.offsets)
    out = a.new_empty(a.shape[0], b.shape[2])
    start = 0
    for e, n in enumerate(plan.counts_list):
        if n:
            torch.mm(a[start : start + n], b[e], out=out[start : start + n])
            start += n
    return out


def gmm_reduce(a: Tensor, b: Tensor, plan: ExpertPlan) -> Tensor:
    """Ragged contraction: ``a[K, rows]`` and ``b[rows, M]`` summed within each expert's rows: ``[E, K, M]``."""
    if plan.padded:
        E, C = plan.n_experts, plan.capacity
        return torch.bmm(a.reshape(a.shape[0], E, C).transpose(0, 1), b.view(E, C, b.shape[1]))
    if _use_grouped_mm(a, b):
        out = _GROUPED_MM(a, b, offs=plan.offsets)
        empty = plan.counts == 0
        if empty.any():  # do not trust what the op leaves in empty groups
            out = out.masked_fill(empty.view(-1, 1, 1), 0)
        return out
    out = a.new_zeros(plan.n_experts, a.shape[0], b.shape[1])
    start = 0
    for e, n in enumerate(plan.counts_list):
        if n:
            torch.mm(a[:, start : start + n], b[start : start + n], out=out[e])
            start += n
    return out


def combine_bags(values: Tensor, plan: ExpertPlan) -> Tensor:
    """Sum each token's k rows: one ``embedding_bag`` over the plan's ``pair_row`` bags (reads only real rows,
    writes each output row once, fixed order: deterministic; about twice as fast as ``index_add_`` on the CPU)."""
    return F.embedding_bag(plan.pair_row, values, mode="sum")


def combine_index_add(values: Tensor, plan: ExpertPlan) -> Tensor:
    """Sum the rows into their tokens with ``index_add_`` (padding rows must hold zeros)."""
    return values.new_zeros(plan.n_tokens, values.shape[1]).index_add_(0, plan.row_token, values)


Combine = Callable[[Tensor, ExpertPlan], Tensor]


def row_weights(weights: Tensor, plan: ExpertPlan) -> Tensor:
    w = weights.reshape(-1).index_select(0, plan.row_pair)
    return w if plan.row_valid is None else w * plan.row_valid.to(w.dtype)


class _GroupedLoRA(torch.autograd.Function):
    # Rows are (token, expert) pairs sorted by expert, ragged or padded to [E, capacity] (see ExpertPlan.padded).
    # Padding rows read token 0 and carry weight 0, so they add exact zeros.
    @staticmethod
    def forward(ctx, x, A, B, weights, plan: ExpertPlan, combine: Combine):
        tok = plan.row_token
        w_rows = row_weights(weights, plan)
        xs = x.index_select(0, tok)
        h = gmm(xs, A.transpose(1, 2), plan)
        hw = h * w_rows.unsqueeze(1)
        B = B.contiguous()  # a pool's B is a strided view; both the expand and the backward's B-GEMM run faster on a copy
        out = combine(gmm(hw, B.transpose(1, 2), plan), plan)
        ctx.save_for_backward(xs, A, B, h, w_rows)
        ctx.plan, ctx.combine = plan, combine
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xs, A, B, h, w_rows = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        grads = grouped_backward(grad_out, xs, A, B, h, w_rows, ctx.plan, ctx.combine, needs)
        return (*grads, None, None)


def grouped_backward(
    grad_out: Tensor,
    x_rows: Tensor,
    A: Tensor,
    B: Tensor,
    h: Tensor,
    w_rows: Tensor,
    plan: ExpertPlan,
    combine: Combine,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for (x, A, B, weights) of the routed LoRA, as grouped GEMMs over the plan's row layout.

    ``x_rows`` is ``x`` gathered to the rows, ``h`` the unscaled ``x_rows @ A_e^T`` and ``w_rows`` the routing
    weight of each row (0 on padding rows). Shared by every implementation whose backward is not its own kernel.
    """
    need_x, need_a, need_b, need_w = needs
    tok = plan.row_token
    gs = grad_out.contiguous().index_select(0, tok)  # [rows, d_out]
    d_hw = gmm(gs, B, plan)  # [rows, r]
    grad_x = grad_a = grad_b = grad_w = None
    if need_b:
        grad_b = gmm_reduce(gs.t(), h * w_rows.unsqueeze(1), plan)  # [E, d_out, r]
    if need_w:
        grad_w_rows = (d_hw * h).sum(1)
        if plan.row_valid is not None:
            grad_w_rows = grad_w_rows * plan.row_valid.to(grad_w_rows.dtype)
        grad_w = grad_w_rows.new_zeros(plan.n_pairs).index_add_(0, plan.row_pair, grad_w_rows)
        grad_w = grad_w.view(plan.n_tokens, plan.top_k)
    if need_a or need_x:
        dh = d_hw * w_rows.unsqueeze(1)
        if need_a:
            grad_a = gmm_reduce(dh.t(), x_rows, plan)  # [E, r, d_in]
        if need_x:
            grad_x = combine(gmm(dh, A, plan), plan)
    return grad_x, grad_a, grad_b, grad_w


def lora_grouped(
    x: Tensor, A: Tensor, B: Tensor, plan: ExpertPlan, weights: Tensor, combine: Combine = combine_bags
) -> Tensor:
    """x: [N, d_in], A: [E, r, d_in], B: [E, d_out, r], weights: [N, k] (scaling folded in)."""
    return _GroupedLoRA.apply(x, A, B, weights, plan, combine)


class _GroupedExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, x, A, B, weights, plan: ExpertPlan):
        w_rows = row_weights(weights, plan)
        xs = x.index_select(0, plan.row_token)
        h = gmm(xs, A.transpose(1, 2), plan)
        B = B.contiguous()  # a pool's B is a strided view; both the expand and the backward's B-GEMM run faster on a copy
        out = combine_bags(gmm(h * w_rows.unsqueeze(1), B.transpose(1, 2), plan), plan).add_(y0)
        ctx.save_for_backward(xs, A, B, h, w_rows)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xs, A, B, h, w_rows = ctx.saved_tensors
        need_y0, *needs = ctx.needs_input_grad[:5]
        grads = grouped_backward(dy, xs, A, B, h, w_rows, ctx.plan, combine_bags, tuple(needs))
        return ((dy if need_y0 else None), *grads, None)


def grouped_expand(y0: Tensor, x: Tensor, A: Tensor, B: Tensor, plan: ExpertPlan, weights: Tensor) -> Tensor:
    """``y0 + grouped_lora(x, A, B, plan, weights)`` (scaling folded into ``weights``), combined straight into y0."""
    return _GroupedExpand.apply(y0, x, A, B, weights, plan)
