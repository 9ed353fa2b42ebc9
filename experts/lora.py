"""LoRA expert pool: E LoRA experts for one linear layer, stored packed.

``lora_A`` is one ``[E*r, d_in]`` weight (row block e = expert e's A) and ``lora_B`` one ``[d_out, E*r]`` weight
(column block e = expert e's B), so the dense-masked formulation uses them as they are and the grouped one uses
the zero-copy views :attr:`LoRAPool.A` ``[E, r, d_in]`` and :attr:`LoRAPool.B` ``[E, d_out, r]``.
Expert e alone is the PEFT LoRA ``lora_A.weight = A[e]``, ``lora_B.weight = B[e]`` with scaling ``alpha / r``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .pool import ExpertPool, PoolSpec, register_expert_kind


class LoRAPool(ExpertPool):
    """A bank of ``n_experts`` rank-``r`` LoRA experts for a ``d_in -> d_out`` linear map."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_experts: int,
        r: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        impl: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__(in_features, out_features, n_experts, r, alpha, dropout, impl)
        self.lora_A = nn.Parameter(torch.empty(n_experts * r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, n_experts * r, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's LoRA init for every expert: A kaiming-uniform (a=sqrt(5)) per expert, B zero."""
        with torch.no_grad():
            for a in self.A:  # per-expert fan-in, exactly as an [r, d_in] PEFT lora_A
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @property
    def A(self) -> Tensor:
        """``[E, r, d_in]`` view of the packed down-projections."""
        return self.lora_A.view(self.n_experts, self.r, self.in_features)

    @property
    def B(self) -> Tensor:
        """``[E, d_out, r]`` view of the packed up-projections."""
        return self.lora_B.view(self.out_features, self.n_experts, self.r).permute(1, 0, 2)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.A, self.B


@register_expert_kind("lora")
def _build_lora_pool(spec: PoolSpec, shared: nn.ModuleDict) -> LoRAPool:
    return LoRAPool(
        spec.in_features, spec.out_features, spec.n_experts, spec.r, spec.alpha, spec.dropout, spec.impl,
        dtype=spec.dtype, device=spec.device, **spec.options,
    )
