"""``xcross``: lock-step stream routing, the routing half of X-Cross (cross-domain integration of LoRA experts).

The pool holds one expert per source model (n = ``n_experts``). The caller stacks n copies of its batch along
the batch dimension, stream-major: rows ``[s*B, (s+1)*B)`` are stream s, and every token of stream s runs
through expert s alone. So the n source models run side by side in one forward pass, through the grouped
kernels, instead of as n separate models. The per-layer integration of the streams (mixing and difference
terms, final weighting) lives with the model that owns the layers: :mod:`moa.recsys.xcross`.

The routing needs nothing from the call (no ids): the batch size says it all. ``top_k`` is ignored (one
expert per token). The sort-by-expert plan is built once per forward call and shared by every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moa.experts import ExpertPlan
from moa.experts.errors import UserError

from .base import Router, Routing, RoutingContext, register_router


@register_router
class XCrossRouter(Router):
    name = "xcross"
    uses_top_k = False  # one expert per token

    def __init__(self, in_features: int, n_experts: int, top_k: int = 1):
        super().__init__(in_features, n_experts, 1)

    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module | None = None) -> Routing:
        lead = tuple(x.shape[:-1])
        plan, weights = ctx.cached(("xcross", lead, x.device), lambda: self._plan(lead, x.device))
        return Routing(plan, weights.to(x.dtype))

    def _plan(self, lead: tuple[int, ...], device: torch.device) -> tuple[ExpertPlan, Tensor]:
        if not lead or lead[0] % self.n_experts:
            raise UserError(
                f"router 'xcross' needs the batch to hold {self.n_experts} stacked streams (one per expert, "
                f"stream-major), so its first dimension must be a multiple of {self.n_experts}; got input "
                f"with leading shape {lead}"
            )
        rows = lead[0]
        stream = torch.arange(self.n_experts, device=device).repeat_interleave(rows // self.n_experts)
        ids = stream.view(rows, *([1] * (len(lead) - 1))).expand(lead).reshape(-1, 1)
        return ExpertPlan(ids, self.n_experts, validate=False), torch.ones(ids.shape, device=device)

    def extra_repr(self) -> str:
        return f"streams={self.n_experts}"
