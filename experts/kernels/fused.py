"""The routed LoRA fused into its frozen base linear layer (the layer-level path of ``MoALinear``).

One GEMM reads ``x`` once for the base layer, the router's gate and (dense routing) every expert's shrink::

    z = x @ [W; A_packed; W_gate]^T + [bias, 0, 0]      -> y0 [N, d_out] | h [N, E*r] | logits [N, E]

and the expand accumulates into the base output instead of being added to it afterwards:

* dense:  ``y = y0 + (h * expand_r(G)) @ B_packed^T``, one ``addmm`` with ``y0`` as its addend;
* sparse: the ``grouped`` impl's grouped GEMMs (``A`` not in the big GEMM: only k of E experts are needed),
  their ``index_add_`` combine into a copy of ``y0``.

Backward, with the base weight frozen: ``dx = [dy | dh | dlogits] @ [W; A; W_gate]`` is one GEMM (sparse: it
accumulates, ``beta = 1``, into the LoRA part of ``dx`` that the grouped backward scattered), and
``[dA; dW_gate] = [dh | dlogits]^T x`` another. The routing between the two steps (softmax, top-k, ...) stays in
autograd: :func:`fused_shrink` returns ``h`` and ``logits``, the router turns the logits into a routing, and
:func:`dense_expand` / :func:`grouped_expand` finish the layer.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .grouped import combine_index_add, gmm, grouped_backward, row_weights
from .plan import ExpertPlan


class _FusedShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, bias, A, gate_w):
        extras = [t.reshape(-1, x.shape[1]) for t in (A, gate_w) if t is not None]
        weight = torch.cat([W, *extras]) if extras else W
        d_out = W.shape[0]
        if bias is None:
            z = x @ weight.t()
        else:
            z = torch.addmm(torch.cat([bias, bias.new_zeros(weight.shape[0] - d_out)]), x, weight.t())
        ctx.save_for_backward(x, weight)
        ctx.d_out = d_out
        ctx.n_a = 0 if A is None else A.shape[0] * A.shape[1]
        ctx.a_shape = None if A is None else A.shape
        h = z[:, d_out : d_out + ctx.n_a]
        logits = z[:, d_out + ctx.n_a :]
        ctx.set_materialize_grads(False)
        # ``x_alias``: the sparse expand takes x through this output, so its dx arrives here to be accumulated into
        return z[:, :d_out], h, logits, x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_y0, d_h, d_logits, d_x_alias):
        x, weight = ctx.saved_tensors
        d_out, n_a = ctx.d_out, ctx.n_a
        need_x, _, _, need_a, need_g = ctx.needs_input_grad
        n = x.shape[0]
        parts = [
            g if g is not None else x.new_zeros(n, cols)
            for g, cols in ((d_y0, d_out), (d_h, n_a), (d_logits, weight.shape[0] - d_out - n_a))
            if cols
        ]
        d_z = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        grad_x = grad_a = grad_g = None
        if need_x:
            if d_x_alias is None:
                grad_x = d_z @ weight
            else:  # the grouped backward's dx is a fresh buffer: accumulate the base part into it
                grad_x = d_x_alias.addmm_(d_z, weight)
        if need_a or need_g:
            d_extra = d_z[:, d_out:]
            grad_extra = d_extra.t() @ x  # [E*r + E, d_in]
            if need_a:
                grad_a = grad_extra[:n_a].view(ctx.a_shape)
            if need_g:
                grad_g = grad_extra[n_a:]
        return grad_x, None, None, grad_a, grad_g


def fused_shrink(
    x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor | None, gate_w: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y0, h, logits, x_alias)`` from one GEMM over ``[W; A; gate_w]``; ``W``, ``bias`` frozen (no gradient).

    x: ``[N, d_in]``; W: ``[d_out, d_in]``; A: ``[E, r, d_in]`` or None (then ``h`` is ``[N, 0]``); gate_w:
    ``[E, d_in]`` or None (then ``logits`` is ``[N, 0]``). ``x_alias`` is ``x`` for a consumer whose gradient
    should be accumulated into by this op's backward (:func:`grouped_expand`).
    """
    return _FusedShrink.apply(x, W, bias, A, gate_w)


class _DenseExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, h, gate, B, scaling):
        E, d_out, r = B.shape
        b_packed = B.permute(1, 0, 2).reshape(d_out, E * r)
        g = gate * scaling
        hw = (h.reshape(-1, E, r) * g.unsqueeze(-1)).view(-1, E * r)
        ctx.save_for_backward(h, g, b_packed, hw)
        ctx.scaling, ctx.b_shape = scaling, B.shape
        return torch.addmm(y0, hw, b_packed.t())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        h, g, b_packed, hw = ctx.saved_tensors
        E, d_out, r = ctx.b_shape
        need_y0, need_h, need_gate, need_b, _ = ctx.needs_input_grad
        dy = dy.contiguous()
        grad_h = grad_gate = grad_b = None
        if need_h or need_gate:
            d_hw = (dy @ b_packed).view(-1, E, r)
            if need_h:
                grad_h = (d_hw * g.unsqueeze(-1)).view(-1, E * r)
            if need_gate:
                grad_gate = (d_hw * h.reshape(-1, E, r)).sum(-1) * ctx.scaling
        if need_b:
            grad_b = (dy.t() @ hw).view(d_out, E, r).permute(1, 0, 2)
        return (dy if need_y0 else None), grad_h, grad_gate, grad_b, None


def dense_expand(y0: Tensor, h: Tensor, gate: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``y0 + (h * expand_r(gate * scaling)) @ B_packed^T`` in one ``addmm``.

    y0: ``[N, d_out]``; h: ``[N, E*r]`` (unscaled ``x @ A_packed^T``); gate: ``[N, E]`` (zero for unrouted
    experts); B: ``[E, d_out, r]``.
    """
    return _DenseExpand.apply(y0, h, gate, B, scaling)


class _GroupedExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, x, A, B, weights, plan: ExpertPlan):
        tok = plan.row_token
        w_rows = row_weights(weights, plan)
        xs = x.index_select(0, tok)
        h = gmm(xs, A.transpose(1, 2), plan)
        out = torch.empty(y0.shape, dtype=y0.dtype, device=y0.device).copy_(y0)
        out.index_add_(0, tok, gmm(h * w_rows.unsqueeze(1), B.transpose(1, 2), plan))
        ctx.save_for_backward(xs, A, B, h, w_rows)
        ctx.plan, ctx.n_tokens = plan, x.shape[0]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xs, A, B, h, w_rows = ctx.saved_tensors
        need_y0, *needs = ctx.needs_input_grad[:5]
        grads = grouped_backward(dy, xs, A, B, h, w_rows, ctx.plan, combine_index_add, ctx.n_tokens, tuple(needs))
        return ((dy if need_y0 else None), *grads, None)


def grouped_expand(y0: Tensor, x: Tensor, A: Tensor, B: Tensor, plan: ExpertPlan, weights: Tensor) -> Tensor:
    """``y0 + grouped_lora(x, A, B, plan, weights)`` (scaling folded into ``weights``) with the combine into ``y0``."""
    return _GroupedExpand.apply(y0, x, A, B, weights, plan)
