"""``MoAConfig``: what to attach where. Validated on construction; saved as JSON next to the weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moa.experts import EXPERT_KINDS, available_impls
from moa.experts.errors import UserError
from moa.routers import ROUTERS

CONFIG_NAME = "moa_config.json"


@dataclass
class MoAConfig:
    """A pool of ``n_experts`` rank-``r`` LoRA experts and a router on every target linear layer.

    Args:
        n_experts: experts per adapted layer (E).
        r: rank of each expert.
        alpha: LoRA alpha; the update is scaled by ``alpha / r`` as in PEFT (default ``alpha = r``, scale 1).
        router: registered router name (``"topk"``, ``"static"``, ...; ``"lora"``: one plain LoRA adapter with
            ``n_experts=1``, PEFT's LoRA).
        top_k: experts per token (k <= E), for routers that use it; others (static, xcross, poly, mhr) ignore it
            and it is set to 1.
        target_modules: module names (matched as the full name or its last components, like PEFT) or one
            regular expression (full match); ``None`` uses PEFT's defaults for the model type.
        dropout: dropout on the experts' input.
        router_options: keyword arguments of the router (e.g. ``{"aux_loss_coef": 0.01}``).
        impl: grouped-kernel implementation (``"auto"``, ``"dense"``, ``"grouped"``, ``"loop"``, ``"scatter"``).
        expert_names: optional names of the experts (e.g. the PEFT adapters they came from), one per expert.
        expert_kind: registered expert kind of the pools (``"lora"``: free LoRA factors); a router that needs
            its own kind of expert (FlyLoRA) builds that instead.
        expert_options: keyword arguments of the expert kind.
        modules_to_save: modules of the base model (names matched like ``target_modules``; e.g. a classifier or
            ``lm_head``) that train in full and are saved with the adapters, as PEFT's ``modules_to_save``.
    """

    n_experts: int = 4
    r: int = 8
    alpha: float | None = None
    router: str = "topk"
    top_k: int = 2
    target_modules: list[str] | str | None = None
    dropout: float = 0.0
    router_options: dict[str, Any] = field(default_factory=dict)
    impl: str = "auto"
    expert_names: list[str] | None = None
    expert_kind: str = "lora"
    expert_options: dict[str, Any] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise UserError(f"unknown router {self.router!r}; available routers: {sorted(ROUTERS)}")
        if not isinstance(self.n_experts, int) or self.n_experts < 1:
            raise UserError(f"n_experts must be a positive integer, got {self.n_experts!r}")
        if not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"r (the rank of each expert) must be an integer >= 1, got {self.r!r}")
        required = getattr(ROUTERS[self.router], "n_experts_required", None)
        if required is not None and self.n_experts != required:  # "lora": one plain adapter
            raise UserError(f"router {self.router!r} takes n_experts={required} (one plain LoRA adapter, no routing); "
                            f"got n_experts={self.n_experts}")
        if not ROUTERS[self.router].uses_top_k:  # e.g. static, poly: top_k is not the user's to set
            self.top_k = 1
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.n_experts:
            raise UserError(f"top_k must be between 1 and n_experts={self.n_experts}, got {self.top_k!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise UserError(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.impl not in available_impls():
            raise UserError(f"unknown impl {self.impl!r}; available: {available_impls()}")
        if isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise UserError(f"target_modules must be non-empty names, got {self.target_modules!r}")
            self.target_modules = list(self.target_modules)
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise UserError(f"target_modules must be a list of names, a regex string or None, got {self.target_modules!r}")
        if self.expert_names is not None:
            self.expert_names = list(self.expert_names)
            if len(self.expert_names) != self.n_experts or len(set(self.expert_names)) != self.n_experts:
                raise UserError(f"expert_names must be {self.n_experts} distinct names, got {self.expert_names!r}")
        if not isinstance(self.router_options, dict):
            raise UserError(f"router_options must be a dict, got {type(self.router_options).__name__}")
        if self.expert_kind not in EXPERT_KINDS:
            raise UserError(f"unknown expert_kind {self.expert_kind!r}; available: {sorted(EXPERT_KINDS)}")
        if not isinstance(self.expert_options, dict):
            raise UserError(f"expert_options must be a dict, got {type(self.expert_options).__name__}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise UserError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)

    @property
    def scaling(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown MoAConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "MoAConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no MoA config at {path}")
        return cls.from_dict(json.loads(path.read_text())["config"])
