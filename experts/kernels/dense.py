"""``dense``: dense-masked routed LoRA, two GEMMs over the packed pool.

``y = ((x @ A_packed^T) * expand_r(G)) @ B_packed^T`` where ``G[N, E]`` holds the routing weights (zero for
unrouted experts). Exact for top-k, no sort / gather / scatter, deterministic, plain autograd. It does ``E/k``
times the FLOPs of the sparse form, which is the cheapest choice while ``E * r`` is small (see ``choose_impl``).
Dense soft routing (weights over all experts) is this path with ``G`` given directly.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .plan import ExpertPlan


def lora_dense(x: Tensor, A: Tensor, B: Tensor, plan: ExpertPlan | None, weights: Tensor) -> Tensor:
    """x: [N, d_in], A: [E, r, d_in], B: [E, d_out, r]; weights [N, k] with a plan, or a dense gate [N, E]."""
    E, r, d_in = A.shape
    gate = weights if plan is None else plan.dense_gate(weights)
    # Views of the packed [E*r, d_in] / [d_out, E*r] weights when A and B come from a pool (no copy).
    a_packed = A.reshape(E * r, d_in)
    b_packed = B.permute(1, 0, 2).reshape(B.shape[1], E * r)
    h = F.linear(x, a_packed)
    h = (h.view(-1, E, r) * gate.unsqueeze(-1)).view(-1, E * r)
    return F.linear(h, b_packed)
