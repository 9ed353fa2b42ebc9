"""``lora``: one plain LoRA adapter per layer, no routing (the baseline every router is compared with).

The pool holds a single expert (``n_experts=1``) that every token uses with weight 1: no gate, no auxiliary loss
and no routing statistics, so the trainable parameters are exactly PEFT LoRA's on the same targets and rank, and
the outputs are PEFT's with the same A and B (``lora_A.weight``, ``lora_B.weight``, scale ``alpha / r``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moa.experts.errors import UserError

from .base import Router, Routing, RoutingContext, register_router


@register_router
class LoRARouter(Router):
    name = "lora"
    uses_top_k = False  # the one expert, always
    n_experts_required = 1  # read by MoAConfig: a pool of one expert

    def __init__(self, in_features: int, n_experts: int, top_k: int = 1):
        super().__init__(in_features, n_experts, top_k)
        if n_experts != 1:
            raise UserError(f"router 'lora' is one plain LoRA adapter: set n_experts=1 (got {n_experts})")

    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module | None = None) -> Routing:
        n = x.numel() // x.shape[-1]
        ones = ctx.cached(("lora-ones", n, x.dtype, x.device), lambda: torch.ones(n, 1, dtype=x.dtype, device=x.device))
        return Routing(None, ones)  # dense weights [N, 1]: the expert's full update on every token

    def extra_repr(self) -> str:
        return "n_experts=1"
