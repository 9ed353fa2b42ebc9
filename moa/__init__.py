"""moa: mixtures of LoRA adapters in transformers models.

Layering (each package imports only those to its left): ``moa.experts`` <- ``moa.routers`` <- ``moa`` (core)
<- ``moa.recsys`` <- ``moa.pipelines``.
"""

from .config import MoAConfig
from .layer import MoALinear
from .model import MoAModel, attach, load
from .peft_bridge import from_peft, to_peft

__version__ = "0.1.0"


def merge(moa_model: MoAModel, route) -> "object":
    """Fold a fixed route (an expert index or per-expert weights) into the base weights; returns the plain model."""
    return moa_model.merge(route)


__all__ = ["MoAConfig", "MoALinear", "MoAModel", "attach", "from_peft", "load", "merge", "to_peft"]
