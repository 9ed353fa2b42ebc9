"""``remix``: ReMix, reinforcement routing for mixtures of LoRAs (Qiu et al., 2026, arXiv 2603.10160).

Per layer: n LoRAs and a router ``q = softmax(P x)``. Training samples k distinct LoRAs from q without replacement
(Gumbel-top-k: an ordered draw whose exact probability is
``Q(J) = prod_i q_{j_i} / (1 - sum_{l<i} q_{j_l})``); inference takes the deterministic top-k of q. Every selected
LoRA contributes with the same constant weight ``omega`` (``alpha / (k r)``, ``alpha = 2`` by default, or the rsLoRA
variant ``alpha / sqrt(k r)``), so a fixed selection is exactly one rank-``k r`` LoRA. ``omega`` is the pool's
scaling and the router returns weight 1 per selected LoRA.

The router never gets a gradient through the selection: its only learning signal is the RLOO estimator of
:class:`moa.rloo.RLOOModule`, which collects ``Routing.log_prob`` (``log Q`` of the drawn selections, summed per
sequence) from every ReMix router's forward call. The log-probability is computed from the *detached* layer
input, so the estimator's term trains P and nothing upstream.

Granularity (the paper's notes say the router sees "each layer input" and are silent on the rest):

* ``"token"`` (default): each token draws its own k LoRAs in each layer, like MixLoRA, the paper's main baseline,
  and the only choice that also routes generated tokens consistently. The reward is per sequence, so
  ``log Q`` of a sequence sums over its real tokens (padding excluded) and the layer.
* ``"sequence"``: one draw per sequence and layer from ``q = softmax(P mean_t x_t)`` (mean over real tokens), applied
  to all of its tokens: fewer decisions per reward, hence a lower-variance estimator; for encoders and scoring,
  not for generation with a KV cache (the pooled input changes as tokens arrive).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moa.experts import PoolSpec, build_pool
from moa.experts.errors import UserError

from .base import Router, Routing, RoutingContext, register_router

SCALES = ("lora", "rslora")
GRANULARITIES = ("token", "sequence")


def gumbel_top_k(logits: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw k distinct indices per row from ``softmax(logits)`` without replacement, in draw order ``[N, k]``."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    return (logits + gumbel).topk(k, dim=-1, sorted=True).indices


def ordered_log_prob(logits: Tensor, ids: Tensor) -> Tensor:
    """``log Q`` of the ordered draws ``ids [N, k]`` without replacement from ``softmax(logits [N, n])``:
    ``sum_i [z_{j_i} - logsumexp(z over the indices not drawn before step i)]``."""
    taken = torch.zeros_like(logits, dtype=torch.bool)
    total = logits.new_zeros(logits.shape[0])
    for i in range(ids.shape[1]):
        pick = ids[:, i : i + 1]
        total = total + logits.gather(1, pick).squeeze(1) - torch.logsumexp(logits.masked_fill(taken, -math.inf), dim=1)
        taken = taken.scatter(1, pick, True)
    return total


def effective_support_size(weights: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean over tokens of ``exp(entropy)`` of each token's normalised routing weights (``[N, k]`` or ``[N, E]``).

    The number of experts a token effectively uses: k for k equal weights, 1 when one weight dominates. Tokens
    with no weight at all (base model only) and masked tokens are left out.
    """
    w = weights.detach().float().reshape(-1, weights.shape[-1]).clamp_min(0)
    total = w.sum(-1)
    keep = total > 0
    if token_mask is not None:
        keep &= token_mask.reshape(-1).bool()
    if not keep.any():
        return w.new_tensor(float("nan"))
    p = w[keep] / total[keep, None]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return entropy.exp().mean()


def _sequence_shape(lead: torch.Size) -> tuple[int, int]:
    """(sequences, tokens per sequence) of a layer input's leading shape; a flat ``[N]`` input is N sequences."""
    if len(lead) <= 1:
        return (lead[0] if lead else 1), 1
    return lead[0], math.prod(lead[1:])


@register_router
class ReMixRouter(Router):
    """Sampled k-of-n routing with constant weights, trained by RLOO (see the module docstring).

    Args:
        scale: ``"lora"`` (``omega = alpha / (k r)``) or ``"rslora"`` (``omega = alpha / sqrt(k r)``); ``alpha`` is
            ``MoAConfig.alpha``, 2 when unset (the paper's ``2 / (k r)``).
        granularity: ``"token"`` or ``"sequence"``.
        init_std: std of the router's normal init (small: q starts near uniform).

    In training the returned :class:`Routing` carries ``log_prob`` ``[B]`` (``log Q`` of the draws per sequence,
    with gradient to P). After each forward, for logging: ``last_router_support`` (mean ``exp(entropy(q))``: how spread the router's distribution is, n = uniform, 1 =
    collapsed on one LoRA) and ``last_support_size`` (:func:`effective_support_size` of the weights: always k).
    """

    name = "remix"
    sampling = True

    def __init__(
        self,
        in_features: int,
        n_experts: int,
        top_k: int,
        scale: str = "lora",
        granularity: str = "token",
        init_std: float = 0.02,
    ):
        super().__init__(in_features, n_experts, top_k)
        if scale not in SCALES:
            raise UserError(f"ReMix scale must be one of {SCALES}, got {scale!r}")
        if granularity not in GRANULARITIES:
            raise UserError(f"ReMix granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.scale, self.granularity = scale, granularity
        self.gate = nn.Linear(in_features, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)
        self.omega: float | None = None  # set by build_pool
        self.last_router_support: Tensor | None = None
        self.last_support_size: Tensor | None = None

    def build_pool(self, kind: str, spec: PoolSpec, shared: nn.ModuleDict) -> nn.Module:
        """The configured pool, with its scaling replaced by the constant ``omega``."""
        pool = build_pool(kind, spec, shared)
        if not hasattr(pool, "scaling"):
            raise UserError(f"router 'remix' needs a pool with a 'scaling' attribute; expert kind {kind!r} has none")
        alpha = 2.0 if spec.alpha is None else float(spec.alpha)
        active_rank = self.top_k * spec.r
        self.omega = alpha / active_rank if self.scale == "lora" else alpha / math.sqrt(active_rank)
        pool.scaling = self.omega
        if hasattr(pool, "alpha") and getattr(pool, "r", None):
            pool.alpha = self.omega * pool.r  # keep the pool's own alpha / r = scaling consistent
        return pool

    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module | None = None) -> Routing:
        lead = x.shape[:-1]
        n_seq, n_tok = _sequence_shape(lead)
        x2 = x.reshape(-1, x.shape[-1]).detach()  # the router learns from RLOO only, never through x
        mask = self._token_mask(ctx, lead)
        if self.granularity == "sequence":
            m = x2.new_ones(n_seq, n_tok) if mask is None else mask.view(n_seq, n_tok).to(x2.dtype)
            pooled = (x2.view(n_seq, n_tok, -1) * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
            logits = self.gate(pooled).float()  # [B, n]
        else:
            logits = self.gate(x2).float()  # [N, n]

        k, n = self.top_k, self.n_experts
        log_prob = None
        if k == n:  # every LoRA, always: the selection has probability 1
            ids = torch.arange(n, device=x.device).expand(logits.shape[0], n)
            log_prob = logits.new_zeros(logits.shape[0]) if self.training else None
        elif self.training:
            ids = self._draw(logits, ctx)
            log_prob = ordered_log_prob(logits, ids)
        else:
            ids = logits.topk(k, dim=-1).indices

        token_weight = None if mask is None else mask.to(logits.dtype)
        with torch.no_grad():
            q = logits.softmax(-1)
            support = (-(q * q.clamp_min(1e-30).log()).sum(-1)).exp()
            if self.granularity == "token" and token_weight is not None:
                self.last_router_support = (support * token_weight).sum() / token_weight.sum().clamp_min(1)
            else:
                self.last_router_support = support.mean()
        if self.granularity == "sequence":
            ids = ids.unsqueeze(1).expand(n_seq, n_tok, k).reshape(-1, k)
        elif log_prob is not None:  # per-token draws: a sequence's log Q sums over its real tokens
            if token_weight is not None:
                log_prob = log_prob * token_weight
            log_prob = log_prob.view(n_seq, n_tok).sum(1)
        weights = x.new_ones(ids.shape)
        self.last_support_size = effective_support_size(weights, mask)
        return Routing(ids, weights, log_prob=log_prob)

    def _token_mask(self, ctx: RoutingContext, lead: torch.Size) -> Tensor | None:
        if ctx.token_mask is None:
            return None
        if not self.training and tuple(ctx.token_mask.shape) != tuple(lead):
            return None  # e.g. one new token of a cached generation: the mask only served the statistics
        return ctx.per_token("token_mask", lead).bool()

    def _draw(self, logits: Tensor, ctx: RoutingContext) -> Tensor:
        """Sample once per forward call; a re-run of the layer (activation checkpointing) reuses the draw."""
        key = ("remix-draw", id(self))
        ids = ctx.cache.get(key)
        if ids is None or ids.shape[0] != logits.shape[0]:
            ids = gumbel_top_k(logits.detach(), self.top_k)
            ctx.cache[key] = ids
        return ids

    def extra_repr(self) -> str:
        omega = "unset" if self.omega is None else f"{self.omega:g}"
        return f"n_experts={self.n_experts}, top_k={self.top_k}, omega={omega} ({self.scale}), granularity={self.granularity!r}"
