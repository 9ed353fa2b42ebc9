"""Expert kinds: what a pool is, and the registry that builds one per adapted layer.

A pool holds the E experts of one linear layer. Every kind offers the same surface, which routers, the layer and
the PEFT bridge rely on:

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
from torch import nn


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


PoolBuilder = Callable[[PoolSpec, nn.ModuleDict], nn.Module]
EXPERT_KINDS: dict[str, PoolBuilder] = {}


def register_expert_kind(name: str) -> Callable[[PoolBuilder], PoolBuilder]:
    """Decorator: make ``builder(spec, shared) -> pool`` available as ``MoAConfig(expert_kind=name)``."""

    def register(builder: PoolBuilder) -> PoolBuilder:
        if name in EXPERT_KINDS and EXPERT_KINDS[name] is not builder:
            raise ValueError(f"an expert kind named {name!r} is already registered")
        EXPERT_KINDS[name] = builder
        return builder

    return register


def build_pool(kind: str, spec: PoolSpec, shared: nn.ModuleDict) -> nn.Module:
    try:
        builder = EXPERT_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown expert kind {kind!r}; available: {sorted(EXPERT_KINDS)}") from None
    try:
        return builder(spec, shared)
    except TypeError as err:
        raise ValueError(f"bad expert_options for expert kind {kind!r}: {err}") from None


def keep_reference(owner: nn.Module, attribute: str, module: nn.Module) -> None:
    """Give ``owner`` an attribute pointing at a shared module without registering it as a submodule."""
    object.__setattr__(owner, attribute, module)
