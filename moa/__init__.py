"""moa: mixtures of LoRA adapters in transformers models.

Layering (each package imports only those to its left): ``moa.experts`` <- ``moa.routers`` <- ``moa`` (core)
<- ``moa.recsys`` <- ``moa.pipelines``.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

# The public names, imported on first use: ``import moa`` stays cheap (the ``moa`` command's help and version
# answer without loading torch and transformers).
_EXPORTS = {
    "MoAConfig": "config", "MoALinear": "layer", "MoAModel": "model", "attach": "model", "load": "model",
    "from_peft": "peft_bridge", "to_peft": "peft_bridge", "follow_optimizer": "training_hooks",
    "MoATrainer": "hf_trainer",
}


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` of a package whose public names (``exports``: name -> submodule) are imported
    on first use (PEP 562), then kept as the package's attributes."""
    module = sys.modules[package]

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(module), *exports})

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


def merge(moa_model: "MoAModel", route) -> "object":
    """Fold a fixed route (an expert index or per-expert weights) into the base weights; returns the plain model."""
    return moa_model.merge(route)


__all__ = ["MoAConfig", "MoALinear", "MoAModel", "MoATrainer", "attach", "follow_optimizer", "from_peft", "load", "merge", "to_peft"]
