"""The router interface: every router, in this issue and the later ones, is one file behind this."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from moa.experts import ExpertPlan, PoolSpec, build_pool
from moa.experts.errors import UserError

CONTEXT_KEYS = ("task_ids", "domain_ids", "expert_ids", "expert_weights")


@dataclass
class Routing:
    """What a router decides for the N (flattened) tokens of one layer call.

    ``expert_ids`` is ``[N, k]`` (or an :class:`ExpertPlan`, whose sort metadata is then shared by every layer that
    reuses it) with ``weights [N, k]``; or ``None`` with dense ``weights [N, E]`` (soft routing).
    ``aux_losses`` are added to the training loss by the model (already multiplied by their coefficients).
    ``factors`` ``(A [G, r, d_in], B [G, d_out, r])`` are adapters the router computed for this call from the
    pool's experts (e.g. Poly's per-task mixtures of skill parameters); ``expert_ids`` then index these G adapters.
    ``usage`` (``[E]``, optional) is the share of routing each expert received, for statistics, when it cannot be
    read off ``expert_ids`` (i.e. when ``factors`` are given).
    ``log_prob`` (``[B]``, sampling routers in training) is the log-probability of the sampled selection per
    sequence, with its gradient to the router (read by ``moa.rloo.RLOOModule``; see :attr:`Router.sampling`).
    """

    expert_ids: Tensor | ExpertPlan | None
    weights: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    factors: tuple[Tensor, Tensor] | None = None
    usage: Tensor | None = None
    log_prob: Tensor | None = None


@dataclass
class RoutingContext:
    """The routing inputs of one forward call of the model, seen by every MoA layer.

    The id tensors are per sample (``[B]``), per token (``[B, T]``), or per sample and slot (``[B, k]`` for
    ``expert_ids``); ``expert_weights`` is a per-sample (or per-token) mixture over experts ``[B, E]``.
    ``token_mask`` (from the model's ``attention_mask``) marks real tokens ``[B, T]``.
    """

    task_ids: Tensor | None = None
    domain_ids: Tensor | None = None
    expert_ids: Tensor | None = None
    expert_weights: Tensor | None = None
    token_mask: Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Build a value once per forward call and share it across layers (e.g. an ExpertPlan)."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def per_token(self, name: str, lead_shape: torch.Size, trailing: int = 0) -> Tensor | None:
        """Context tensor ``name`` broadcast to the layer's token shape and flattened: ``[N, *trailing dims]``.

        ``trailing`` is the number of per-token feature dims the tensor carries (1 for ``expert_weights``).
        """
        value = getattr(self, name)
        if value is None:
            return None
        lead = tuple(lead_shape)
        own = tuple(value.shape[: value.dim() - trailing])
        tail = tuple(value.shape[value.dim() - trailing :])
        if own == lead:
            out = value
        elif len(own) == 1 and len(lead) >= 1 and own[0] == lead[0]:  # per sample -> every token of the sample
            out = value.reshape(own[0], *([1] * (len(lead) - 1)), *tail).expand(*lead, *tail)
        else:
            raise UserError(
                f"{name} has shape {tuple(value.shape)}, which fits neither one value per sample ({lead[0] if lead else '?'},) "
                f"nor one per token {lead} of this layer's input"
            )
        return out.reshape(-1, *tail)


class Router(nn.Module):
    """Decides, for each token of a layer's input, which experts of the pool run and with which weights.

    Subclasses set ``name`` and implement :meth:`forward`; they may return auxiliary losses in the
    :class:`Routing` and override :meth:`param_groups` to give their parameters an optimizer group of their own.
    A router that needs a particular kind of expert (or a module shared by all layers) overrides
    :meth:`build_pool`, which :func:`moa.attach` calls once per adapted layer.
    """

    name: ClassVar[str] = ""
    # Whether a fixed mixture of the pool's expert OUTPUTS is this router's computation, so that merging or
    # exporting ``sum_e m_e B_e A_e`` is meaningful. Routers that mix expert parameters (Poly, MHR) set False.
    mixes_expert_outputs: ClassVar[bool] = True
    # Whether the router reads ``MoAConfig.top_k``. Routers that fix their own number of adapters per token (static,
    # xcross: one expert; Poly, MHR: one mixed adapter) set False, and the config then sets top_k = 1 unchecked.
    uses_top_k: ClassVar[bool] = True
    # Whether the router samples its selection in training and returns its log-probability (``Routing.log_prob``),
    # to be trained by a score-function estimator (ReMix, with ``moa.rloo.RLOOModule``).
    sampling: ClassVar[bool] = False

    def __init__(self, in_features: int, n_experts: int, top_k: int):
        super().__init__()
        self.in_features, self.n_experts, self.top_k = in_features, n_experts, top_k

    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module) -> Routing:  # pragma: no cover - interface
        """``x`` is the layer input ``[..., d_in]``; the returned routing covers its flattened tokens.

        ``pool`` is the layer's expert pool (see :mod:`moa.experts.pool`), for routers that route on the experts
        themselves (FlyLoRA's implicit router) or mix their parameters (Poly, MHR).
        """
        raise NotImplementedError

    def build_pool(self, kind: str, spec: PoolSpec, shared: nn.ModuleDict) -> nn.Module:
        """The expert pool of the layer this router serves: by default the configured expert kind."""
        return build_pool(kind, spec, shared)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimizer group; routers train in group ``"router"`` unless they say otherwise."""
        params = [p for p in self.parameters() if p.requires_grad]
        return {"router": params} if params else {}

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}"


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make a router available by its ``name`` in ``MoAConfig(router=...)``."""
    if not cls.name:
        raise UserError(f"{cls.__name__} must set a class attribute 'name'")
    if cls.name in ROUTERS and ROUTERS[cls.name] is not cls:
        raise UserError(f"a router named {cls.name!r} is already registered ({ROUTERS[cls.name].__name__})")
    ROUTERS[cls.name] = cls
    return cls


def build_router(name: str, in_features: int, n_experts: int, top_k: int, **options) -> Router:
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise UserError(f"unknown router {name!r}; available routers: {sorted(ROUTERS)}") from None
    try:
        return cls(in_features, n_experts, top_k, **options)
    except TypeError as err:
        raise UserError(f"bad router_options for router {name!r}: {err}") from None
