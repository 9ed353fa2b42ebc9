"""``arrow``: training-free token-wise routing over a library of LoRA experts (Ostapenko et al. 2024, arXiv
2405.11157; PEFT's ``ArrowConfig`` / ``create_arrow_model``), and ``uniform``, the fixed equal mixture it is
compared against.

Arrow: per expert e and layer, the prototype ``p_e`` is the top right singular vector of ``dW_e = B_e A_e``; per
token, ``s_e = |x . p_e|``, the ``top_k`` largest are kept and weighted ``softmax(s_topk / temperature)``. There
are no parameters. moa computes the prototypes exactly (a float64 SVD of the small factors, through QR); PEFT runs
15 power-iteration steps from a random vector, which agrees to float precision only when the top two singular
values are well apart (ratio <= ~0.5).

Prototypes are derived from the pool and cached. A layer checks its factors' storage and version counter on every
call (no pass over the weights); when they changed (loading, an optimizer step, a new pool), each expert's factors
are hashed and only experts whose bytes were never seen get a new SVD: a process-wide cache keyed by content
means a pool assembled again with one more expert computes one prototype per layer. Changes made through
``.data`` bypass the version counter and are not seen. An expert with ``dW_e = 0`` on a layer (it does not adapt
that layer) has the prototype 0: score 0, selected last.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa.experts import ExpertPool, PoolSpec
from moa.experts.errors import UserError

from .base import Router, Routing, RoutingContext, register_router

CACHE_SIZE = 4096  # prototypes kept process-wide (one float32 vector of d_in each)
_cache: "OrderedDict[str, Tensor]" = OrderedDict()
_cache_lock = threading.Lock()


def top_right_singular_vector(a: Tensor, b: Tensor) -> Tensor:
    """The unit top right singular vector ``[d_in]`` (float64, CPU) of ``b @ a`` (``a [r, d_in]``, ``b [d_out, r]``)
    without forming it: ``a^T = Q_a R_a``, ``b = Q_b R_b``, so ``b a = Q_b (R_b R_a^T) Q_a^T`` and the SVD of the
    ``r x r`` core gives ``v = Q_a v_core``. Zero when ``b a = 0``. The sign is fixed (largest entry positive)."""
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    q_a, r_a = torch.linalg.qr(a.T)
    _, r_b = torch.linalg.qr(b)
    _, s, vh = torch.linalg.svd(r_b @ r_a.T)
    if not s[0] > 0:
        return torch.zeros(a.shape[1], dtype=torch.float64)
    v = q_a @ vh[0]
    return v * torch.sign(v[v.abs().argmax()])


def _expert_key(a: Tensor, b: Tensor) -> str:
    digest = hashlib.sha256()
    for t in (a, b):
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prototype(a: Tensor, b: Tensor) -> Tensor:
    """Expert ``(a, b)``'s prototype, from the process-wide cache when these exact factors were seen."""
    key = _expert_key(a, b)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    vector = top_right_singular_vector(a, b).float()
    with _cache_lock:
        _cache[key] = vector
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return vector


def _lora_factors(pool: nn.Module, router: str) -> tuple[Tensor, Tensor]:
    if not isinstance(pool, ExpertPool) or not hasattr(pool, "lora_A"):
        raise UserError(f"router {router!r} routes over stored LoRA experts; this layer's pool is a "
                        f"{type(pool).__name__} (use expert_kind 'lora')")
    return pool.factors()


@register_router
class ArrowRouter(Router):
    """Arrow's token-wise top-k over expert prototypes; ``temperature`` divides the scores before the softmax."""

    name = "arrow"

    def __init__(self, in_features: int, n_experts: int, top_k: int, temperature: float = 1.0):
        super().__init__(in_features, n_experts, top_k)
        if not 1 <= top_k <= n_experts:
            raise UserError(f"Arrow's top_k must be between 1 and the number of experts ({n_experts}), got {top_k}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise UserError(f"Arrow's temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self._prototypes: Tensor | None = None  # [E, d_in] in the input's dtype and device
        self._stamp: tuple | None = None  # the factors' storage, version, dtype and device when they were built

    def build_pool(self, kind: str, spec: PoolSpec, shared: nn.ModuleDict) -> nn.Module:
        if kind != "lora":
            raise UserError(f"router 'arrow' routes over LoRA experts (their delta W's singular vectors); "
                            f"expert_kind must be 'lora', got {kind!r}")
        return super().build_pool(kind, spec, shared)

    gate_reads_pool = True  # MoALinear passes the pool to fusable_gate

    def prototypes(self, pool: nn.Module, like: Tensor | None = None) -> Tensor:
        """``[E, d_in]`` prototypes of ``pool``'s experts in ``like``'s dtype and device (default: the factors'),
        rebuilt only when its factors changed."""
        params = pool._parameters if isinstance(pool, ExpertPool) else {}
        packed_a, packed_b = params.get("lora_A"), params.get("lora_B")  # the factors are views of these
        if packed_a is None or packed_b is None:
            _lora_factors(pool, self.name)  # raises the user error for a pool without stored LoRA factors
            packed_a, packed_b = pool.factors()
        like = packed_a if like is None else like
        stamp = (packed_a.data_ptr(), packed_a._version, packed_b.data_ptr(), packed_b._version, packed_a.dtype,
                 like.dtype, like.device)
        if self._stamp != stamp or self._prototypes is None:
            A, B = _lora_factors(pool, self.name)
            with torch.inference_mode(False):  # kept across calls: usable in training after a serving call
                vectors = torch.stack([prototype(A[e], B[e]) for e in range(A.shape[0])])
                self._prototypes, self._stamp = vectors.to(like.device, like.dtype), stamp
        return self._prototypes

    def fusable_gate(self, pool: nn.Module) -> Tensor:
        """The prototypes ``[E, d_in]`` (in the factors' dtype): the logits ``x @ P^T`` that :meth:`route_logits`
        turns into the routing may come out of the layer's own GEMMs (no pass of the router's)."""
        return self._checked(self.prototypes(pool))

    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module) -> Routing:
        x2 = x.reshape(-1, x.shape[-1])
        protos = self._checked(self.prototypes(pool, x2))
        return self.route_logits(F.linear(x2, protos), ctx, x.shape[:-1], x.dtype)

    def route_logits(self, logits: Tensor, ctx: RoutingContext, lead, dtype: torch.dtype) -> Routing:
        """The routing of tokens whose projections ``x . p_e`` ``[N, E]`` are given: ``top_k`` of ``|x . p_e|``,
        softmax over the selected divided by the temperature."""
        scores = logits.abs()
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k == self.n_experts:  # every expert: the dense path
            return Routing(None, F.softmax(scores, dim=-1).to(dtype))
        selected, ids = scores.topk(self.top_k, dim=-1)  # one op: several times faster than top_ids here
        return Routing(ids, F.softmax(selected, dim=-1).to(dtype))

    def _checked(self, protos: Tensor) -> Tensor:
        if protos.shape[0] != self.n_experts:
            raise UserError(f"router 'arrow' was built for {self.n_experts} experts, the pool has {protos.shape[0]}")
        return protos

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}, temperature={self.temperature:g}"


@register_router
class UniformRouter(Router):
    """Every token gets every expert with weight ``1 / E``: the fixed equal mixture of the experts' outputs (for
    linear experts, the uniform merge ``sum_e B_e A_e / E``). No parameters, no inputs read."""

    name = "uniform"
    uses_top_k = False

    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module | None = None) -> Routing:
        n = x.reshape(-1, x.shape[-1]).shape[0]
        return Routing(None, x.new_full((n, self.n_experts), 1.0 / self.n_experts))

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}"
