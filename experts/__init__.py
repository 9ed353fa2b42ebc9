"""Expert pools and the grouped expert kernels (the leftmost layer of moa: it imports nothing from moa)."""

from .kernels import IMPLS, ExpertPlan, available_impls, choose_impl, grouped_lora, runnable_impls
from .lora import LoRAPool

__all__ = ["IMPLS", "ExpertPlan", "LoRAPool", "available_impls", "choose_impl", "grouped_lora", "runnable_impls"]
