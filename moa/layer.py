"""``MoALinear``: a frozen base linear layer plus a routed pool of LoRA experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from moa.experts import ExpertPlan
from moa.routers import Router, Routing, RoutingContext


class ContextSlot:
    """Holds the routing context of the current forward call; one slot is shared by all layers of a model.

    The context is replaced at the start of every forward call and not cleared at its end, so activation
    checkpointing, which re-runs layers during backward, sees the same context as the forward did.
    """

    def __init__(self):
        self.current = RoutingContext()


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"MoA adapts nn.Linear and transformers Conv1D layers, not {type(module).__name__}")


def linear_weight(module: nn.Module) -> Tensor:
    """The base weight in ``nn.Linear`` layout ``[d_out, d_in]`` (a view for Conv1D)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


class MoALinear(nn.Module):
    """``y = base(x) + sum_j w_j * (alpha/r) * B_e A_e x`` with (e, w) chosen by the router."""

    def __init__(self, base_layer: nn.Module, pool: nn.Module, router: Router, slot: ContextSlot):
        super().__init__()
        self.base_layer = base_layer
        self.pool = pool
        self.router = router
        self._slot = slot  # a plain attribute: not a submodule, not in the state dict
        self.disabled = False
        self.aux_losses: dict[str, Tensor] = {}
        self.last_usage: Tensor | None = None

    def __getstate__(self):
        """Copies and pickles leave out the last call's aux losses (graph tensors that deepcopy cannot copy)."""
        state = self.__dict__.copy()
        state["aux_losses"] = {}
        return state

    @property
    def in_features(self) -> int:
        return self.pool.in_features

    @property
    def out_features(self) -> int:
        return self.pool.out_features

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        routing = self.router(x, self._slot.current, self.pool)
        self.aux_losses = routing.aux_losses
        self._record_usage(routing)
        update = self.pool(x.reshape(-1, x.shape[-1]), routing.expert_ids, routing.weights, routing.factors)
        return result + update.view(result.shape).to(result.dtype)

    @torch.no_grad()
    def _record_usage(self, routing: Routing) -> None:
        ids = routing.expert_ids
        if routing.usage is not None:
            usage = routing.usage.detach().float()
        elif routing.factors is not None:  # ids index the router's own adapters, not experts
            self.last_usage = None
            return
        elif ids is None:
            usage = routing.weights.float().sum(0)
        else:
            flat = (ids.expert_ids if isinstance(ids, ExpertPlan) else ids).reshape(-1)
            usage = torch.zeros(self.pool.n_experts, device=flat.device).index_add_(
                0, flat, (routing.weights.reshape(-1) != 0).float()
            )
        self.last_usage = usage / usage.sum().clamp_min(1e-12)

    @torch.no_grad()
    def merged_weight(self, mixture: Tensor) -> Tensor:
        """Base weight (nn.Linear layout) with a fixed expert mixture folded in."""
        return linear_weight(self.base_layer) + self.pool.delta_weight(mixture).to(self.base_layer.weight.dtype)
