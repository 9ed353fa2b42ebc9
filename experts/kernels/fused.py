"""The routed LoRA fused into its frozen base linear layer (the layer-level path of ``MoALinear``).

One GEMM reads ``x`` once for the base layer, the router's gate and (dense routing) every expert's shrink::

    z = x @ [W; A_packed; W_gate]^T + [bias, 0, 0]      -> y0 [N, d_out] | h [N, E*r] | logits [N, E]

and the expand accumulates into the base output instead of being added to it afterwards:

* dense:  ``y = (y0 + bias) + (h * expand_r(G)) @ B_packed^T``: the copy of ``y0`` out of ``z`` adds the bias,
  an in-place ``addmm_`` the experts;
* sparse: the ``grouped`` impl's grouped GEMMs (``A`` not in the big GEMM: only k of E experts are needed) and
  its ``embedding_bag`` combine, added to ``y0``.

Backward, with the base weight frozen: ``dx = dy @ W + [dh | dlogits] @ [A; W_gate]`` accumulated in place
(``addmm_``; sparse: into the LoRA part of ``dx`` that the grouped backward combined), and
``[dA; dW_gate] = [dh | dlogits]^T x`` in one GEMM. The routing between the two steps (softmax, top-k, ...) stays in
autograd: :func:`fused_shrink` returns ``h`` and ``logits``, the router turns the logits into a routing, and
:func:`dense_expand` / :func:`~.grouped.grouped_expand` finish the layer.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpp import sparse_gate_backward


class _FusedShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, bias, A, gate_w):
        d_out, n_a = W.shape[0], 0 if A is None else A.shape[0] * A.shape[1]
        ctx.d_out, ctx.n_a, ctx.a_shape = d_out, n_a, None if A is None else A.shape
        ctx.set_materialize_grads(False)
        # x_alias: the sparse expand reads x through this output, so its dx arrives here to be accumulated into
        y0, h, logits = shrink_forward(x, W, bias, A, gate_w, ctx.save_for_backward)
        return y0, h, logits, x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_y0, d_h, d_logits, d_x_alias):
        x, *weights = ctx.saved_tensors
        d_out, n_a = ctx.d_out, ctx.n_a
        w_base, w_extra = weights if len(weights) == 2 else (weights[0][:d_out], weights[0][d_out:])
        need_x, _, _, need_a, need_g = ctx.needs_input_grad
        n, n_g = x.shape[0], w_extra.shape[0] - n_a
        if d_logits is None and n_g:  # no gradient reached the logits (a routed kernel took the gate's): no gate GEMMs
            w_extra, n_g, need_g = w_extra[:n_a], 0, False
        grad_x = grad_a = grad_g = None
        if n_a == 0 and d_logits is not None and n_g and (need_x or need_g) and not need_a:
            # top-k routing without the aux loss in the backward: d_logits is zero but for k entries per row
            grad_x = d_x_alias if need_x else None
            if need_x and d_y0 is not None:
                grad_x = d_y0 @ w_base if grad_x is None else grad_x.addmm_(d_y0, w_base)
            if grad_x is not None or not need_x:
                done, grad_g = sparse_gate_backward(d_logits, x, w_extra, grad_x, need_g)
                if done:
                    return grad_x, None, None, None, grad_g
            d_x_alias, d_y0 = grad_x, None  # dense GEMMs for the gate: dx already holds the rest
        parts = [g if g is not None else x.new_zeros(n, c) for g, c in ((d_h, n_a), (d_logits, n_g)) if c]
        d_extra = (torch.cat(parts, 1) if len(parts) > 1 else parts[0].contiguous()) if parts else None
        grad_x = grad_a = grad_g = None
        if need_x:
            grad_x = d_x_alias  # the grouped backward's dx (a buffer of its own), or None
            if d_y0 is not None:
                grad_x = d_y0 @ w_base if grad_x is None else grad_x.addmm_(d_y0, w_base)
            if d_extra is not None:
                grad_x = d_extra @ w_extra if grad_x is None else grad_x.addmm_(d_extra, w_extra)
        if (need_a or need_g) and d_extra is not None:
            grad_extra = d_extra.t() @ x  # [E*r + E, d_in]
            if need_a:
                grad_a = grad_extra[:n_a].view(ctx.a_shape)
            if need_g:
                grad_g = grad_extra[n_a:]
        return grad_x, None, None, grad_a, grad_g


# Rows from which one GEMM over the concatenated [W; A; W_gate] pays for copying W into it (prefill, training);
# below, decode-sized calls run the base GEMM on W itself and one small GEMM over [A; W_gate].
CONCAT_MIN_ROWS = 256


def shrink_forward(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor | None, gate_w: Tensor | None,
                   save=None) -> tuple[Tensor, Tensor, Tensor]:
    """``(y0, h, logits)`` of :func:`fused_shrink` without autograd; ``save(x, weight)`` or ``save(x, W, extra)``
    receives what the backward needs."""
    d_out, n = W.shape[0], x.shape[0]
    extras = [t.reshape(-1, x.shape[1]) for t in (A, gate_w) if t is not None]
    if extras and (n < CONCAT_MIN_ROWS or A is None):
        # two GEMMs: no copy of W (the gate alone: as fast as one GEMM over [W; W_gate]) and a contiguous y0 that
        # the expand may accumulate into in place
        extra = torch.cat(extras) if len(extras) > 1 else extras[0]
        y0 = x @ W.t() if bias is None else torch.addmm(bias, x, W.t())
        z = x @ extra.t()
        if save is not None:
            save(x, W, extra)
        n_a = 0 if A is None else A.shape[0] * A.shape[1]
        return y0, z[:, :n_a], z[:, n_a:]
    weight = torch.cat([W, *extras]) if extras else W
    if bias is None:
        z = x @ weight.t()
    else:
        z = torch.addmm(torch.cat([bias, bias.new_zeros(weight.shape[0] - d_out)]), x, weight.t())
    if save is not None:
        save(x, weight)
    n_a = 0 if A is None else A.shape[0] * A.shape[1]
    return z[:, :d_out], z[:, d_out : d_out + n_a], z[:, d_out + n_a :]


def fused_shrink(
    x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor | None, gate_w: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y0, h, logits, x_alias)`` from one GEMM over ``[W; A; gate_w]``; ``W``, ``bias`` frozen (no gradient).

    x: ``[N, d_in]``; W: ``[d_out, d_in]``; bias: ``[d_out]`` or None (added to ``y0`` only); A: ``[E, r, d_in]`` or
    None (then ``h`` is ``[N, 0]``); gate_w: ``[E, d_in]`` or None (then ``logits`` is ``[N, 0]``). ``x_alias`` is
    ``x`` for a consumer whose gradient this op's backward should accumulate into (:func:`~.grouped.grouped_expand`).
    """
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, gate_w))):
        return (*shrink_forward(x, W, bias, A, gate_w), x)  # inference: no autograd node to build
    return _FusedShrink.apply(x, W, bias, A, gate_w)


def expand_forward(y0, h, gate, B, bias, scaling) -> tuple[Tensor, tuple[Tensor, ...]]:
    """:func:`dense_expand`'s output and the tensors its backward needs, without autograd."""
    E, d_out, r = B.shape
    b_packed = B.permute(1, 0, 2).reshape(d_out, E * r)
    g = gate * scaling
    hw = (h.reshape(-1, E, r) * g.unsqueeze(-1)).view(-1, E * r)
    out = torch.add(y0, bias) if bias is not None else torch.empty(y0.shape, dtype=y0.dtype, device=y0.device).copy_(y0)
    out.addmm_(hw, b_packed.t())
    return out, (h, g, b_packed, hw)


class _DenseExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, h, gate, B, bias, scaling):
        out, saved = expand_forward(y0, h, gate, B, bias, scaling)
        ctx.save_for_backward(*saved)
        ctx.scaling = scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        h, g, b_packed, hw = ctx.saved_tensors
        need_y0, need_h, need_gate, need_b, _, _ = ctx.needs_input_grad
        d_out, n_r = b_packed.shape
        E = g.shape[1]
        dy = dy.contiguous()
        grad_h = grad_gate = grad_b = None
        if need_h or need_gate:
            d_hw = (dy @ b_packed).view(-1, E, n_r // E)
            if need_h:
                grad_h = (d_hw * g.unsqueeze(-1)).view(-1, n_r)
            if need_gate:
                grad_gate = (d_hw * h.reshape(-1, E, n_r // E)).sum(-1) * ctx.scaling
        if need_b:  # (hw^T dy)^T: about twice as fast on the CPU as dy^T hw
            grad_b = (hw.t() @ dy).t().view(d_out, E, n_r // E).permute(1, 0, 2)
        return (dy if need_y0 else None), grad_h, grad_gate, grad_b, None, None


def dense_expand(y0: Tensor, h: Tensor, gate: Tensor, B: Tensor, scaling: float, bias: Tensor | None = None) -> Tensor:
    """``y0 + bias + (h * expand_r(gate * scaling)) @ B_packed^T`` (bias frozen).

    y0: ``[N, d_out]``; h: ``[N, E*r]`` (unscaled ``x @ A_packed^T``); gate: ``[N, E]`` (zero for unrouted
    experts); B: ``[E, d_out, r]``.
    """
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (y0, h, gate, B))):
        return expand_forward(y0, h, gate, B, bias, scaling)[0]  # inference: no autograd node to build
    return _DenseExpand.apply(y0, h, gate, B, bias, scaling)
