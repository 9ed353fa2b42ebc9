"""``scatter``: the grouped implementation with its combine done by torch-scatter (optional dependency).

Only registered when ``torch_scatter`` imports (``pip install moa[scatter]``; it builds from source).
"""

from __future__ import annotations

from torch import Tensor

from .grouped import lora_grouped
from .plan import ExpertPlan

try:
    import torch_scatter
except ImportError:  # pragma: no cover - depends on the environment
    torch_scatter = None

AVAILABLE = torch_scatter is not None


def combine_torch_scatter(values: Tensor, plan: ExpertPlan) -> Tensor:
    return torch_scatter.scatter(values, plan.row_token, dim=0, dim_size=plan.n_tokens, reduce="sum")


def lora_scatter(x: Tensor, A: Tensor, B: Tensor, plan: ExpertPlan, weights: Tensor) -> Tensor:
    if not AVAILABLE:
        raise RuntimeError("impl='scatter' needs torch-scatter: pip install 'moa[scatter]'")
    return lora_grouped(x, A, B, plan, weights, combine=combine_torch_scatter)
