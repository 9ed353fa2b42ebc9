"""``topk``: a learned softmax gate with top-k selection (the MixLoRA / Mixtral-style baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Router, Routing, RoutingContext, register_router


def top_ids(scores: Tensor, k: int) -> Tensor:
    """Indices ``[N, k]`` of each row's k largest scores, largest first (``scores.topk(k).indices``); for small k by
    k row maxima, each masking the previous one's index (a fraction of ``topk``'s cost on the CPU)."""
    if k > 4:
        return scores.topk(k, dim=-1).indices
    first = scores.max(-1, keepdim=True).indices
    if k == 1:
        return first
    ids, masked = [first], scores.clone()
    for _ in range(k - 1):
        masked.scatter_(-1, ids[-1], float("-inf"))
        ids.append(masked.max(-1, keepdim=True).indices)
    return torch.cat(ids, -1)


@register_router
class TopKRouter(Router):
    """``p = softmax(W_g x)``; each token goes to its top-k experts with weights ``p_topk / sum(p_topk)``.

    Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4, with top-k assignments counted):
    ``aux = coef * E * sum_e f_e * P_e`` where ``f_e`` is the fraction of (token, slot) assignments that went to
    expert e and ``P_e`` the mean router probability of e, both over real (non-padding) tokens. It is 1 * coef
    for perfectly uniform routing. ``coef`` defaults to 0.01 as in Switch and MixLoRA.
    """

    name = "topk"

    def __init__(
        self,
        in_features: int,
        n_experts: int,
        top_k: int,
        aux_loss_coef: float = 0.01,
        jitter_noise: float = 0.0,
        renormalize: bool = True,
    ):
        super().__init__(in_features, n_experts, top_k)
        self.aux_loss_coef, self.jitter_noise, self.renormalize = aux_loss_coef, jitter_noise, renormalize
        self.gate = nn.Linear(in_features, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module | None = None) -> Routing:
        x2 = x.reshape(-1, x.shape[-1])
        if self.training and self.jitter_noise > 0:
            x2 = x2 * torch.empty_like(x2).uniform_(1 - self.jitter_noise, 1 + self.jitter_noise)
        return self.route_logits(self.gate(x2), ctx, x.shape[:-1], x.dtype)

    def fusable_gate(self) -> Tensor | None:
        """The gate weight ``[E, d_in]`` when the logits are exactly ``x @ W_g^T`` (no jitter, no hooks on the gate),
        so a caller may compute them inside a larger GEMM and pass them to :meth:`route_logits`; else None."""
        if (self.training and self.jitter_noise > 0) or self.gate._forward_hooks or self.gate._forward_pre_hooks:
            return None
        return self.gate.weight

    def sparse_softmax_weights(self) -> bool:
        """Whether :meth:`route_logits`' weights are exactly the softmax of each row's k selected logits (sparse
        routing, renormalised): a kernel given the gate weight may then apply their backward itself."""
        return self.renormalize and self.top_k < self.n_experts and type(self).route_logits is TopKRouter.route_logits

    def route_logits(self, logits: Tensor, ctx: RoutingContext, lead, dtype: torch.dtype) -> Routing:
        """The routing of tokens whose gate logits ``[N, E]`` are given (``lead``: the tokens' leading shape)."""
        # at least fp32 (half-precision logits are upcast; fp64 stays fp64, so fp64 gradients check exactly)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        aux_loss = self.training and self.aux_loss_coef > 0
        # the full softmax only where it is used: soft routing, unnormalised weights, the load-balancing loss
        need_probs = self.top_k == self.n_experts or not self.renormalize or aux_loss
        probs = F.softmax(logits, dim=-1) if need_probs else None
        if self.top_k == self.n_experts:
            weights, ids = probs, None  # soft routing over all experts: the dense path
        else:
            ids = top_ids(logits.detach(), self.top_k)  # softmax is monotonic: the top-k logits are the top-k probs
            if self.renormalize:  # p_topk / sum(p_topk) is the softmax of the k selected logits (the others cancel)
                weights = F.softmax(logits.gather(-1, ids), dim=-1)
            else:
                weights = probs.gather(-1, ids)
        aux = {}
        if aux_loss:
            aux["load_balance"] = self.aux_loss_coef * self.load_balance_loss(probs, ids, ctx, lead)
        return Routing(ids, weights.to(dtype), aux)

    def load_balance_loss(self, probs: Tensor, ids: Tensor | None, ctx: RoutingContext, lead) -> Tensor:
        if ctx.token_mask is None:  # every token is real: plain means and counts
            n_real = max(probs.shape[0], 1)
            mean_prob = probs.sum(0) / n_real
            counts = None if ids is None else torch.bincount(ids.reshape(-1), minlength=self.n_experts).to(probs.dtype)
        else:
            mask = ctx.per_token("token_mask", lead).to(probs.dtype)
            n_real = mask.sum().clamp_min(1)
            mean_prob = (probs * mask[:, None]).sum(0) / n_real
            counts = None if ids is None else torch.zeros_like(mean_prob).index_add_(
                0, ids.reshape(-1), mask.repeat_interleave(ids.shape[1])
            )
        if ids is None:
            frac = mean_prob.detach()
        else:
            frac = counts / (n_real * ids.shape[1])
        return self.n_experts * (frac * mean_prob).sum()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, aux_loss_coef={self.aux_loss_coef}"
