"""Expert kinds: what a pool is, and the registry that builds one per adapted layer.

A pool holds the E experts of one linear layer. Every kind subclasses :class:`ExpertPool` and so offers the same
surface, which routers, the layer and the PEFT bridge rely on (a kind only says where its factors come from):

* ``in_features``, ``out_features``, ``n_experts``, ``r``, ``scaling`` (``alpha / r``, PEFT's convention);
* ``A`` ``[E, r, d_in]`` and ``B`` ``[E, d_out, r]``: the experts' factors (stored, or generated);
* ``forward(x, expert_ids, weights, factors=None)``: the routed update, through the grouped kernels; ``factors``
  ``(A, B)`` computed by a router for this call replace the pool's own (``expert_ids`` then index them);
* ``delta_weight(mixture)``: the ``[d_out, d_in]`` update of a fixed mixture over experts (merging, export).

Modules that several layers share (a hypernetwork, routing logits shared across layers) live once in the
model's ``shared`` ``nn.ModuleDict``; a layer keeps an unregistered reference (:func:`keep_reference`) so that
the state dict, ``parameters()`` and the saved file hold them exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import UserError
from .kernels import ExpertPlan, grouped_lora


@dataclass
class PoolSpec:
    """Everything a pool builder needs to know about the layer it serves."""

    in_features: int
    out_features: int
    n_experts: int
    r: int
    alpha: float | None = None
    dropout: float = 0.0
    impl: str = "auto"
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    name: str = ""  # the adapted layer's module path, e.g. "model.layers.3.self_attn.q_proj"
    all_names: tuple[str, ...] = ()  # every adapted layer's path, in attach order
    options: dict[str, Any] = field(default_factory=dict)  # MoAConfig.expert_options


class ExpertPool(nn.Module):
    """The surface every expert kind shares; a kind says where its factors come from (:meth:`factors`)."""

    def __init__(
        self, in_features: int, out_features: int, n_experts: int, r: int, alpha: float | None = None,
        dropout: float = 0.0, impl: str = "auto",
    ):
        super().__init__()
        if n_experts < 1 or r < 1:
            raise UserError(f"a LoRA pool needs n_experts >= 1 and r >= 1, got n_experts={n_experts}, r={r}")
        self.in_features, self.out_features = in_features, out_features
        self.n_experts, self.r = n_experts, r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = self.alpha / r
        self.impl = impl
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """``(A [E, r, d_in], B [E, d_out, r])``, the experts' factors in PEFT's layout."""
        raise NotImplementedError

    def packed_factors(self) -> tuple[Tensor, Tensor]:
        """``(A_packed [E*r, d_in], B_packed [d_out, E*r])``: the factors as two matrices (views for a packed pool),
        for the dense-masked form ``((x @ A_packed^T) * gate) @ B_packed^T``."""
        A, B = self.factors()
        return A.reshape(-1, A.shape[-1]), B.permute(1, 0, 2).reshape(B.shape[1], -1)

    @property
    def A(self) -> Tensor:
        return self.factors()[0]

    @property
    def B(self) -> Tensor:
        return self.factors()[1]

    def forward(
        self,
        x: Tensor,
        expert_ids: "Tensor | ExpertPlan | None",
        weights: Tensor,
        factors: "tuple[Tensor, Tensor] | None" = None,
    ) -> Tensor:
        """Routed update ``sum_j w_j * scaling * B_e A_e x`` (see :func:`moa.experts.kernels.grouped_lora`).

        ``factors`` ``(A [G, r, d_in], B [G, d_out, r])``, computed by a router for this call, replace the pool's
        experts; ``expert_ids`` then index their G entries.
        """
        A, B = self.factors() if factors is None else factors
        return grouped_lora(self.dropout(x), A, B, expert_ids, weights, self.scaling, impl=self.impl)

    def delta_weight(self, mixture: Tensor) -> Tensor:
        """``[d_out, d_in]`` weight update of a fixed mixture over experts (``mixture[E]``): ``sum_e m_e s B_e A_e``."""
        A, B = self.factors()
        mixture = torch.as_tensor(mixture, dtype=A.dtype, device=A.device)
        if mixture.shape != (self.n_experts,):
            raise UserError(f"a fixed route needs one weight per expert ({self.n_experts}), got {tuple(mixture.shape)}")
        return torch.einsum("eor,eri->oi", B * (mixture * self.scaling).view(-1, 1, 1), A)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, n_experts={self.n_experts}, "
            f"r={self.r}, alpha={self.alpha:g}, impl={self.impl!r}"
        )


PoolBuilder = Callable[[PoolSpec, nn.ModuleDict], nn.Module]
EXPERT_KINDS: dict[str, PoolBuilder] = {}


def register_expert_kind(name: str) -> Callable[[PoolBuilder], PoolBuilder]:
    """Decorator: make ``builder(spec, shared) -> pool`` available as ``MoAConfig(expert_kind=name)``."""

    def register(builder: PoolBuilder) -> PoolBuilder:
        if name in EXPERT_KINDS and EXPERT_KINDS[name] is not builder:
            raise UserError(f"an expert kind named {name!r} is already registered")
        EXPERT_KINDS[name] = builder
        return builder

    return register


def build_pool(kind: str, spec: PoolSpec, shared: nn.ModuleDict) -> nn.Module:
    try:
        builder = EXPERT_KINDS[kind]
    except KeyError:
        raise UserError(f"unknown expert kind {kind!r}; available: {sorted(EXPERT_KINDS)}") from None
    try:
        return builder(spec, shared)
    except TypeError as err:
        raise UserError(f"bad expert_options for expert kind {kind!r}: {err}") from None


def keep_reference(owner: nn.Module, attribute: str, module: nn.Module) -> None:
    """Give ``owner`` an attribute pointing at a shared module without registering it as a submodule."""
    object.__setattr__(owner, attribute, module)
