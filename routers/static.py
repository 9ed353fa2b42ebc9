"""``static``: explicit routing from the forward call, one expert (or a fixed mixture) per request.

Many adapters in one batch, each request its own (S-LoRA / PEFT ``adapter_names`` serving). The ids come from
the routing context: ``expert_ids`` by default, or ``domain_ids`` / ``task_ids`` when the pool holds one expert
per domain or task (``router_options={"key": "domain_ids"}``). An id of ``-1`` means "no expert" (base model
only, PEFT's ``"__base__"``). ``expert_weights=[B, E]`` gives each request a fixed mixture instead. The
sort-by-expert plan is built once per forward call and shared by every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moa.experts import ExpertPlan
from moa.experts.errors import UserError, UserTypeError

from .base import Router, Routing, RoutingContext, register_router

KEYS = ("expert_ids", "domain_ids", "task_ids")


@register_router
class StaticRouter(Router):
    name = "static"
    uses_top_k = False  # one expert per token

    def __init__(self, in_features: int, n_experts: int, top_k: int = 1, key: str = "expert_ids"):
        super().__init__(in_features, n_experts, top_k)
        if key not in KEYS:
            raise UserError(f"static router key must be one of {KEYS}, got {key!r}")
        self.key = key

    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module | None = None) -> Routing:
        lead = x.shape[:-1]
        if ctx.expert_weights is not None:
            weights = ctx.cached(("static-weights", lead), lambda: self._mixture(ctx, lead))
            return Routing(None, weights.to(x.dtype))
        if getattr(ctx, self.key) is None:
            given = [key for key in reversed(KEYS) if getattr(ctx, key) is not None]  # task_ids first
            hint = (f"; this call gives {', '.join(given)}: route by them with router_options: {{key: {given[0]}}}"
                    if given else "; moa's data modules give task_ids: route by them with router_options: "
                    "{key: task_ids}")
            raise UserError(f"router 'static' needs {self.key}=... (one expert id per sample or per token) in the "
                            f"forward call{hint}")
        plan, weights = ctx.cached(("static", self.key, lead), lambda: self._plan(ctx, lead))
        return Routing(plan, weights.to(x.dtype))

    def one_expert(self, ctx: RoutingContext, lead, dtype: torch.dtype) -> tuple[Routing, int] | None:
        """``(routing, e)`` when every token of this call uses expert ``e`` with weight 1 (``-1``: every token the
        base alone), else None; decided once per forward call and shared by every layer (``MoALinear``'s
        one-expert inference path)."""
        if ctx.expert_weights is not None or getattr(ctx, self.key) is None:
            return None
        return ctx.cached(("static-one", self.key, lead, dtype), lambda: self._one_expert(ctx, lead, dtype))

    def _one_expert(self, ctx: RoutingContext, lead, dtype: torch.dtype) -> tuple[Routing, int] | None:
        plan, weights = ctx.cached(("static", self.key, lead), lambda: self._plan(ctx, lead))
        raw = ctx.per_token(self.key, lead)
        if not raw.numel() or int(raw.min()) != int(raw.max()):
            return None
        return Routing(plan, weights.to(dtype)), int(raw[0])

    def _mixture(self, ctx: RoutingContext, lead) -> Tensor:
        weights = ctx.per_token("expert_weights", lead, trailing=1)
        if weights.shape[-1] != self.n_experts:
            raise UserError(f"expert_weights must give {self.n_experts} weights per sample, got {weights.shape[-1]}")
        return weights

    def _plan(self, ctx: RoutingContext, lead) -> tuple[ExpertPlan, Tensor]:
        ids = getattr(ctx, self.key)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise UserTypeError(f"{self.key} must be integer ids, got dtype {ids.dtype}")
        ids = ctx.per_token(self.key, lead).reshape(-1, 1)
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.n_experts):
            raise UserError(
                f"{self.key} must lie in [-1, {self.n_experts - 1}] for a pool of {self.n_experts} experts "
                f"(-1 = no expert); got values in [{int(ids.min())}, {int(ids.max())}]"
            )
        active = ids >= 0
        weights = active.float()
        return ExpertPlan(ids.clamp_min(0), self.n_experts, validate=False), weights

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, key={self.key!r}"
