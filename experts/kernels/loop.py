"""``loop``: the reference implementation, one expert at a time (the MixLoRA / HF-Mixtral pattern).

Kept as the correctness baseline and the speed baseline; ``auto`` never picks it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import ExpertPlan


def lora_loop(x: Tensor, A: Tensor, B: Tensor, plan: ExpertPlan, weights: Tensor) -> Tensor:
    """``out[n] = sum_j weights[n, j] * B[e] @ A[e] @ x[n]`` with ``e = plan.expert_ids[n, j]``.

    x: [N, d_in], A: [E, r, d_in], B: [E, d_out, r], weights: [N, k] (scaling already folded in).
    """
    out = x.new_zeros(x.shape[0], B.shape[1])
    for e in range(plan.n_experts):
        token, slot = torch.nonzero(plan.expert_ids == e, as_tuple=True)  # empty experts too: keeps out in the graph
        h = x.index_select(0, token) @ A[e].t()
        y = (h @ B[e].t()) * weights[token, slot].unsqueeze(-1)
        out = out.index_add(0, token, y)
    return out
