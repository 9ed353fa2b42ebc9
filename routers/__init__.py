"""Routers: one file each, behind the small interface of :mod:`moa.routers.base`."""

from . import static, topk  # noqa: F401  (registers the built-in routers)
from .base import CONTEXT_KEYS, ROUTERS, Router, Routing, RoutingContext, build_router, register_router
from . import poly  # noqa: F401,E402  (registers "poly" and "mhr")
from . import xcross  # noqa: F401,E402  (registers "xcross")
from . import flylora  # noqa: F401,E402  (registers "flylora")
from . import remix  # noqa: F401,E402  (registers "remix")
from . import lora  # noqa: F401,E402  (registers "lora": one plain LoRA adapter, no routing)
from . import arrow  # noqa: F401,E402  (registers "arrow", training-free over LoRA experts, and "uniform")

__all__ = ["CONTEXT_KEYS", "ROUTERS", "Router", "Routing", "RoutingContext", "build_router", "register_router"]
