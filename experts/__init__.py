"""Expert pools and the grouped expert kernels (the leftmost layer of moa: it imports nothing from moa)."""

from .kernels import IMPLS, ExpertPlan, available_impls, choose_impl, grouped_lora, runnable_impls
from .pool import EXPERT_KINDS, ExpertPool, PoolSpec, build_pool, keep_reference, register_expert_kind
from .lora import LoRAPool  # noqa: E402  (registers the "lora" kind)
from .hyper import HyperLoRAPool, LoRAHyperNetwork  # noqa: E402,F401  (registers the "hyper" kind)

__all__ = [
    "EXPERT_KINDS", "IMPLS", "ExpertPlan", "ExpertPool", "LoRAPool", "PoolSpec", "available_impls", "build_pool", "choose_impl",
    "grouped_lora", "keep_reference", "register_expert_kind", "runnable_impls",
]
