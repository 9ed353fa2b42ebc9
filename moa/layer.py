"""``MoALinear``: a frozen base linear layer plus a routed pool of LoRA experts."""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from moa.experts import ExpertPlan, ExpertPool, LoRAPool, choose_impl, grouped_lora
from moa.experts.errors import UserTypeError
from moa.experts.kernels.cpp import cpp_expand, cpp_expand_routed
from moa.experts.kernels.fused import dense_expand, fused_shrink
from moa.experts.kernels.grouped import grouped_expand
from moa.routers import Router, Routing, RoutingContext


class ContextSlot:
    """Holds the routing context of the current forward call; one slot is shared by all layers of a model.

    The context is replaced at the start of every forward call and not cleared at its end, so activation
    checkpointing, which re-runs layers during backward, sees the same context as the forward did. Each thread
    that calls the model sees the context it set last (threads that serve requests at once keep their own
    routing); a thread that never set one (autograd's device threads re-running checkpointed layers) sees the
    context set last by any thread.
    """

    def __init__(self, context: RoutingContext | None = None):
        self._latest = context if context is not None else RoutingContext()
        self._local = threading.local()

    @property
    def current(self) -> RoutingContext:
        return getattr(self._local, "context", self._latest)

    @current.setter
    def current(self, context: RoutingContext) -> None:
        self._local.context = self._latest = context

    def __reduce__(self):  # copies and pickles (deepcopy of a model) carry the context, not the thread's slots
        return (ContextSlot, (self.current,))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise UserTypeError(f"MoA adapts nn.Linear and transformers Conv1D layers, not {type(module).__name__}")


def linear_weight(module: nn.Module) -> Tensor:
    """The base weight in ``nn.Linear`` layout ``[d_out, d_in]`` (a view for Conv1D)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def packed_factors(pool: ExpertPool) -> tuple[Tensor, Tensor]:
    """``pool.packed_factors()``; for a pool that keeps :class:`LoRAPool`'s layout, its two parameters themselves
    (no views built per call)."""
    cls = type(pool)
    if cls.factors is LoRAPool.factors and cls.A is LoRAPool.A and cls.B is LoRAPool.B:
        params = pool._parameters
        return params["lora_A"], params["lora_B"]
    return pool.packed_factors()


def expert_factors(pool: ExpertPool, expert: int) -> tuple[Tensor, Tensor]:
    """Expert ``expert``'s ``(A [r, d_in], B [d_out, r])``, views of the pool's factors."""
    cls = type(pool)
    if cls.factors is LoRAPool.factors and cls.A is LoRAPool.A and cls.B is LoRAPool.B:
        params, r = pool._parameters, pool.r
        return params["lora_A"][expert * r : (expert + 1) * r], params["lora_B"][:, expert * r : (expert + 1) * r]
    A, B = pool.factors()
    return A[expert], B[expert]


class MoALinear(nn.Module):
    """``y = base(x) + sum_j w_j * (alpha/r) * B_e A_e x`` with (e, w) chosen by the router."""

    def __init__(self, base_layer: nn.Module, pool: nn.Module, router: Router, slot: ContextSlot):
        super().__init__()
        self.base_layer = base_layer
        self.pool = pool
        self.router = router
        self._slot = slot  # a plain attribute: not a submodule, not in the state dict
        self.disabled = False
        self.aux_losses: dict[str, Tensor] = {}
        self._last_routing: Routing | None = None  # the last call's routing; its usage is computed when read

    def __getstate__(self):
        """Copies and pickles leave out the last call's aux losses and routing (graph tensors that deepcopy cannot
        copy); they keep its usage."""
        state = self.__dict__.copy()
        usage = self.last_usage
        state["aux_losses"], state["_last_routing"] = {}, None if usage is None else Routing(None, usage[None])
        state.pop("_transposed_factors", None)  # a cache, rebuilt on the next inference call
        return state

    @property
    def in_features(self) -> int:
        return self.pool.in_features

    @property
    def out_features(self) -> int:
        return self.pool.out_features

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if not args and not kwargs and not torch.is_grad_enabled():
            y = self._one_expert_forward(x)
            if y is not None:
                return y
        fusable = not args and not kwargs and self._fusable(x)
        if fusable:
            router = self.router
            fusable_gate = getattr(type(router), "fusable_gate", None)  # on the class: no Module.__getattr__ miss
            gate_w = None if fusable_gate is None else (
                fusable_gate(router, self.pool) if getattr(router, "gate_reads_pool", False) else fusable_gate(router)
            )
            if gate_w is not None and gate_w.dtype == x.dtype and gate_w.device == x.device:
                return self._fused_forward(x, None, gate_w)  # the router's logits come out of the base GEMM
        else:
            result = self.base_layer(x, *args, **kwargs)
        routing = self._route(self.router(x, self._slot.current, self.pool))
        if fusable and routing.factors is None:
            return self._fused_forward(x, routing, None)
        update = self.pool(x.reshape(-1, x.shape[-1]), routing.expert_ids, routing.weights, routing.factors)
        if fusable:
            result = self.base_layer(x)
        return result + update.view(result.shape).to(result.dtype)

    def _route(self, routing: Routing) -> Routing:
        state = self.__dict__  # plain attributes: skip nn.Module.__setattr__'s checks (once per layer and call)
        state["aux_losses"], state["_last_routing"] = routing.aux_losses, routing
        return routing

    def _one_expert_forward(self, x: Tensor) -> Tensor | None:
        """Inference when every token of this call uses the same one expert with weight 1 (static routing of a
        single request or a one-task batch; the router decides once per forward call): ``y = x W^T + b + s (x
        A_e^T) B_e^T`` on views of expert e's factors, no routing machinery (an expert of -1: the base alone).
        None when the router cannot say so (then the general paths run)."""
        modules = self._modules
        router = modules["router"]
        one_expert = getattr(type(router), "one_expert", None)
        if one_expert is None:
            return None
        found = one_expert(router, self._slot.current, x.shape[:-1], x.dtype)
        if found is None or not self._fusable(x):
            return None
        routing, expert = found
        base, pool = modules["base_layer"], modules["pool"]
        if expert >= 0:
            a, b = expert_factors(pool, expert)
            if a.dtype != x.dtype or b.dtype != x.dtype or a.device != x.device or b.device != x.device:
                return None
            dropout = pool._modules["dropout"]
            if type(dropout) is not nn.Identity and dropout.training:
                return None
        self._route(routing)
        y = torch.nn.functional.linear(x, base.weight, base.bias)
        if expert >= 0:
            h = torch.nn.functional.linear(x, a)
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=pool.scaling)
        return y

    def _fusable(self, x: Tensor) -> bool:
        """Whether the fused path (:mod:`moa.experts.kernels.fused`) computes exactly what the modules would: a plain
        frozen ``nn.Linear`` base (not a subclass such as a quantized linear, no hooks), a LoRA-style pool with the
        stock forward and ``impl="auto"``, one dtype and device, no autocast."""
        modules = self._modules
        base, pool = modules["base_layer"], modules["pool"]
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return False
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return False
        if not isinstance(pool, ExpertPool) or type(pool).forward is not ExpertPool.forward or pool.impl != "auto":
            return False
        if pool._forward_hooks or pool._forward_pre_hooks:
            return False
        if x.dtype != weight.dtype or x.device != weight.device or torch.is_autocast_enabled(x.device.type):
            return False
        return True

    def _fused_forward(self, x: Tensor, routing: Routing | None, gate_w: Tensor | None) -> Tensor:
        """Base layer, router gate (when ``gate_w`` is given; else ``routing`` is already known) and the routed
        experts with the shrink (dense routing) in the base GEMM and the combine into its output."""
        pool, base = self.pool, self.base_layer
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        E, r = pool.n_experts, pool.r
        if routing is None:
            top_k = self.router.top_k
        elif routing.expert_ids is None:
            top_k = None
        else:
            ids = routing.expert_ids
            top_k = ids.top_k if isinstance(ids, ExpertPlan) else routing.weights.shape[-1]
        impl = choose_impl(n, E, r, top_k, x.device.type)
        no_dropout = isinstance(pool.dropout, nn.Identity) or not pool.dropout.training
        if impl == "dense" and no_dropout and not torch.is_grad_enabled():  # inference: no autograd, fewest ops
            y = self._dense_inference(x2, routing, gate_w, x.shape[:-1])
            if y is not None:
                return y.view(*x.shape[:-1], y.shape[-1])
        A, B = pool.factors()
        same = A.dtype == B.dtype == x.dtype and A.device == B.device == x.device
        shrink_in_gemm = impl == "dense" and no_dropout and same
        dense = impl == "dense" and same
        # dense: the bias rides on the expand's copy of y0, cpp: on the kernel's first pass over y0; else on the GEMM
        bias_in_expand = dense or (impl == "cpp" and same)
        shrink_bias = None if bias_in_expand else base.bias
        y0, h, logits, x_alias = fused_shrink(x2, base.weight, shrink_bias, A if shrink_in_gemm else None, gate_w)
        if routing is None:
            routing = self._route(self.router.route_logits(logits, self._slot.current, x.shape[:-1], x.dtype))
        ids, weights = routing.expert_ids, routing.weights.reshape(n, routing.weights.shape[-1])
        if ids is not None and not isinstance(ids, ExpertPlan):  # top-k ids from our own gate are valid by construction
            ids = ExpertPlan(ids.reshape(n, weights.shape[1]), E, validate=gate_w is None)
        x_lora = x2 if no_dropout else pool.dropout(x2)
        if dense:
            gate = weights if ids is None else ids.dense_gate(weights)
            if not shrink_in_gemm:
                h = x_lora @ A.reshape(E * r, -1).t()
            y = dense_expand(y0, h, gate, B, pool.scaling, base.bias)
        elif impl == "cpp" and same and no_dropout and gate_w is not None and self._sparse_softmax():
            # the weights are the softmax of the k selected logits x . gate_w[e]: the kernel's backward takes their
            # gradient to the gate and x (no pass of the gate's own); in place onto y0 (the GEMM's, read by no other)
            y = cpp_expand_routed(y0, x_alias, A, B, ids, weights, pool.scaling, gate_w, base.bias, True)
        elif impl == "cpp" and same:  # the C++ kernel accumulates onto y0 + bias (grouped for fp16/bf16)
            y = cpp_expand(  # in place (the last True): y0 is the base GEMM's own output, read by nothing else
                y0, x_alias if no_dropout else x_lora, A, B, ids, weights * pool.scaling, base.bias, True
            )
        elif impl == "grouped" and same:
            y = grouped_expand(y0, x_alias if no_dropout else x_lora, A, B, ids, weights * pool.scaling)
        else:  # the triton kernel (CUDA), or factors of another dtype: the routed update, then one add
            y = y0 + grouped_lora(x_lora, A, B, ids, weights, pool.scaling, impl=impl).to(y0.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _dense_inference(
        self, x2: Tensor, routing: Routing | None, gate_w: Tensor | None, lead: torch.Size
    ) -> Tensor | None:
        """The dense-masked layer without autograd (decode, serving) in the fewest ops: ``y = x W^T + b``,
        ``h = x A_packed^T`` scaled in place by the gate, ``y += scaling * h B_packed^T``. A static plan's gate is
        built once per forward call (:meth:`ExpertPlan.dense_gate`) and shared by every layer. None when the
        factors' dtype or device differ from ``x``'s (the general path then casts)."""
        pool, base = self.pool, self.base_layer
        n, E, r = x2.shape[0], pool.n_experts, pool.r
        a_packed, b_packed = packed_factors(pool)
        if not (a_packed.dtype == b_packed.dtype == x2.dtype and a_packed.device == b_packed.device == x2.device):
            return None
        y = x2 @ base.weight.t() if base.bias is None else torch.addmm(base.bias, x2, base.weight.t())
        shrink_t, b_packed_t = self._transposed(a_packed, b_packed, gate_w)
        if shrink_t is None:
            h = x2 @ a_packed.t()
            logits = None if routing is not None else x2 @ gate_w.t()
        else:  # the shrink and the gate in one GEMM
            z = x2 @ shrink_t
            h, logits = z[:, : E * r], z[:, E * r :]
        if routing is None:
            routing = self._route(self.router.route_logits(logits, self._slot.current, lead, x2.dtype))
        ids, weights = routing.expert_ids, routing.weights
        if weights.dim() != 2:
            weights = weights.reshape(n, weights.shape[-1])
        if ids is None:
            gate = weights
        elif gate_w is not None and not isinstance(ids, ExpertPlan):  # top-k of our own gate: valid, no plan needed
            gate = weights.new_zeros(n, E).scatter_add_(1, ids.reshape(n, -1), weights)
        else:
            plan = ids if isinstance(ids, ExpertPlan) else ExpertPlan(ids.reshape(n, -1), E)
            gate = plan.dense_gate(weights)
        h = h.view(n, E, r).mul(gate.unsqueeze(-1)) if shrink_t is not None else h.view(n, E, r).mul_(gate.unsqueeze(-1))
        return y.addmm_(h.view(n, E * r), b_packed.t() if b_packed_t is None else b_packed_t, alpha=pool.scaling)

    def _transposed(self, a_packed: Tensor, b_packed: Tensor, gate_w: Tensor | None):
        """``([A_packed; gate_w]^T, B_packed^T)`` contiguous, kept while the factors (and the gate) are the same
        parameter tensors at the same version: small-N GEMMs on the CPU run up to 4x faster on them than on the
        transposed views (``x @ A^T``). ``(None, None)`` for factors a pool computes per call. Like Arrow's
        prototypes, in-place edits through ``.data`` bypass the version counter and are not seen."""
        if not (isinstance(a_packed, nn.Parameter) and isinstance(b_packed, nn.Parameter)):
            return None, None
        versions = tuple(None if t is None or t.is_inference() else t._version for t in (a_packed, b_packed, gate_w))
        kept = self.__dict__.get("_transposed_factors")
        if kept is not None and kept[0] is a_packed and kept[1] is b_packed and kept[2] is gate_w and kept[3] == versions:
            return kept[4], kept[5]
        shrink = a_packed if gate_w is None else torch.cat([a_packed, gate_w.to(a_packed.dtype)])
        shrink_t, b_packed_t = shrink.detach().t().contiguous(), b_packed.detach().t().contiguous()
        self.__dict__["_transposed_factors"] = (a_packed, b_packed, gate_w, versions, shrink_t, b_packed_t)
        return shrink_t, b_packed_t

    def _sparse_softmax(self) -> bool:
        return getattr(self.router, "sparse_softmax_weights", bool)()

    @property
    @torch.no_grad()
    def last_usage(self) -> Tensor | None:
        """The share of routing slots each expert received in the last call (computed when read, not per call)."""
        routing = self._last_routing
        if routing is None or self.pool.n_experts == 1:  # one expert (router "lora"): no routing to report
            return None
        ids = routing.expert_ids
        if routing.usage is not None:
            usage = routing.usage.detach().float()
        elif routing.factors is not None:  # ids index the router's own adapters, not experts
            return None
        elif ids is None:
            usage = routing.weights.detach().float().sum(0)
        else:
            flat = (ids.expert_ids if isinstance(ids, ExpertPlan) else ids).reshape(-1)
            usage = torch.zeros(self.pool.n_experts, device=flat.device).index_add_(
                0, flat, (routing.weights.detach().reshape(-1) != 0).float()
            )
        return usage / usage.sum().clamp_min(1e-12)

    @torch.no_grad()
    def merged_weight(self, mixture: Tensor) -> Tensor:
        """Base weight (nn.Linear layout) with a fixed expert mixture folded in."""
        return linear_weight(self.base_layer) + self.pool.delta_weight(mixture).to(self.base_layer.weight.dtype)
