"""Routing metadata for the grouped expert kernels.

An :class:`ExpertPlan` describes one routing decision over N tokens (each token sent to k experts). The
sort-by-expert metadata the grouped kernels need (permutation, token of each pair, group offsets) is computed
lazily, once, and shared by every layer that reuses the same decision (vLLM's ``LoRAKernelMeta`` idea): with
per-request static routing every adapted layer of a forward pass shares one plan.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ..errors import UserError, UserTypeError


class ExpertPlan:
    """Expert assignment ``expert_ids[N, k]`` (int) over ``n_experts`` experts, plus cached grouping metadata."""

    def __init__(self, expert_ids: Tensor, n_experts: int, *, validate: bool = True):
        if not isinstance(expert_ids, Tensor):
            raise UserTypeError(f"expert_ids must be a tensor, got {type(expert_ids).__name__}")
        if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
            raise UserTypeError(f"expert_ids must be an integer tensor, got dtype {expert_ids.dtype}")
        if expert_ids.dim() != 2:
            raise UserError(f"expert_ids must have shape [N, k], got {tuple(expert_ids.shape)}")
        if n_experts < 1:
            raise UserError(f"n_experts must be >= 1, got {n_experts}")
        if validate and expert_ids.numel():
            lo, hi = int(expert_ids.min()), int(expert_ids.max())
            if lo < 0 or hi >= n_experts:
                raise UserError(
                    f"expert_ids must lie in [0, {n_experts - 1}] for a pool of {n_experts} experts; "
                    f"got values in [{lo}, {hi}]"
                )
        self.expert_ids = expert_ids.long()
        self.n_experts = n_experts

    @classmethod
    def all_experts(cls, n_tokens: int, n_experts: int, device=None) -> "ExpertPlan":
        """Every token to every expert: the grouped form of dense (soft) routing."""
        ids = torch.arange(n_experts, device=device).expand(n_tokens, n_experts)
        return cls(ids, n_experts, validate=False)

    @property
    def n_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    @cached_property
    def order(self) -> Tensor:
        """Stable permutation of the flattened (token, slot) pairs that groups them by expert."""
        return torch.argsort(self.expert_ids.reshape(-1), stable=True)

    @cached_property
    def counts(self) -> Tensor:
        return torch.bincount(self.expert_ids.reshape(-1), minlength=self.n_experts)

    @cached_property
    def offsets(self) -> Tensor:
        """int32 end offset of each expert's group (the ``offs`` of ``torch.nn.functional.grouped_mm``)."""
        return torch.cumsum(self.counts, 0).to(torch.int32)

    @cached_property
    def counts_list(self) -> list[int]:
        """Group sizes on the host (one device sync), for the segment-loop fallback."""
        return self.counts.tolist()

    @cached_property
    def capacity(self) -> int:
        """Rows per expert in the padded layout (the largest group)."""
        return max(self.counts_list) if self.n_tokens else 0

    @cached_property
    def padded(self) -> bool:
        """Use the padded ``[E, capacity]`` layout (batched GEMMs) instead of the ragged one.

        On the CPU, one ``bmm`` over ``E`` equal groups runs about 3x faster than ``grouped_mm``'s loop over
        ragged groups, so padding pays while it wastes at most half again the rows (balanced routing). Skewed
        routing (one expert takes most tokens) keeps the ragged layout, whose cost does not depend on skew.
        """
        return self.expert_ids.device.type == "cpu" and self.n_experts * self.capacity <= 1.5 * self.n_pairs

    @property
    def n_pairs(self) -> int:
        return self.expert_ids.numel()

    @cached_property
    def row_pair(self) -> Tensor:
        """For each row of the layout, the flat (token * k + slot) pair it holds (padding rows: pair 0)."""
        if not self.padded:
            return self.order
        rows = torch.zeros(self.n_experts * self.capacity, dtype=torch.long, device=self.expert_ids.device)
        return rows.index_copy_(0, self.padded_destination, self.order)

    @cached_property
    def padded_destination(self) -> Tensor:
        """Row of each expert-sorted pair in the padded layout."""
        starts = self.offsets.long() - self.counts
        expert = self.expert_ids.reshape(-1).index_select(0, self.order)
        rank_in_group = torch.arange(self.n_pairs, device=self.order.device) - starts.index_select(0, expert)
        return expert * self.capacity + rank_in_group

    @cached_property
    def row_valid(self) -> Tensor | None:
        """1 for real rows, 0 for padding (``None`` in the ragged layout, where every row is real)."""
        if not self.padded:
            return None
        valid = torch.zeros(self.n_experts * self.capacity, device=self.expert_ids.device)
        return valid.index_fill_(0, self.padded_destination, 1.0)

    @cached_property
    def pair_row(self) -> Tensor:
        """``[N, k]``: the layout row of each (token, slot) pair, the bags of an ``embedding_bag`` combine."""
        rows = self.padded_destination if self.padded else torch.arange(self.n_pairs, device=self.order.device)
        return torch.empty_like(self.order).index_copy_(0, self.order, rows).view(self.n_tokens, self.top_k)

    @cached_property
    def row_token(self) -> Tensor:
        """Token of each row of the layout."""
        return torch.div(self.row_pair, self.top_k, rounding_mode="floor")

    def dense_gate(self, weights: Tensor) -> Tensor:
        """Scatter per-pair ``weights[N, k]`` into a dense ``[N, E]`` gate (zero for unrouted experts).

        The gate of the last ``weights`` without gradient is kept: layers that share this plan and its weights
        (static routing) build it once per forward call."""
        last = self.__dict__.get("_last_gate")
        if last is not None and last[0] is weights:
            return last[1]
        gate = weights.new_zeros(self.n_tokens, self.n_experts).scatter_add(1, self.expert_ids, weights)
        if not weights.requires_grad:
            self._last_gate = (weights, gate)
        return gate
