"""Routers: one file each, behind the small interface of :mod:`moa.routers.base`."""

from . import static, topk  # noqa: F401  (registers the built-in routers)
from .base import CONTEXT_KEYS, ROUTERS, Router, Routing, RoutingContext, build_router, register_router

__all__ = ["CONTEXT_KEYS", "ROUTERS", "Router", "Routing", "RoutingContext", "build_router", "register_router"]
