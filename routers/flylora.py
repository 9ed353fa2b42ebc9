"""``flylora``: FlyLoRA, an implicit rank-wise mixture of experts (Zou et al., NeurIPS 2025, arXiv 2510.08396).

One rank-R LoRA whose R rank-1 components ``b_i a_i^T`` are the experts. The down-projection A is a frozen sparse
random projection (each row has ``p = d_in // (R // k)`` non-zeros drawn from N(0, 1/R^2)) and doubles as the
router: per token ``y = A x``, the k ranks with the largest ``y + d`` are selected, and the update is
``(alpha / R) * B (y * mask)``. The routing bias ``d`` changes the selection only, never the value, and is moved by
``+-u`` toward balanced rank usage (loss-free load balancing, DeepSeek-V3 style). There are no router parameters.

In moa terms the pool is a :class:`~moa.experts.LoRAPool` of ``E = R`` experts of rank 1 (so
``MoAConfig(router="flylora", n_experts=R, r=R, top_k=k)``: both numbers are the total rank), its scaling is
``alpha / R`` (PEFT's convention for the total rank, not ``alpha / 1``), and the router returns the k selected
ranks with weight 1, so the grouped kernels compute ``s * B (y * mask)`` without a loop over ranks.

Differences from the official code (gfyddha/FlyLoRA, PEFT path), on purpose:

* the bias is updated only in training mode, counts only real tokens (``attention_mask``), and is applied once per
  optimizer step with the counts accumulated since the previous step (gradient accumulation included), when the
  optimizer is followed (``moa.training_hooks.follow_optimizer``; ``MoAModule`` does it for its optimizers); a
  layer re-run by activation checkpointing neither counts twice nor selects differently, because ``d`` does not
  move until the step;
* ``A x`` keeps its gradient with respect to ``x`` (the official path computes it under ``no_grad``, so upstream
  layers get no gradient through the adapter branch); A itself never gets one;
* each layer's A is drawn from its own seed, derived from ``seed`` and the layer's module path, and the seed is
  stored with the model (A is saved too), so a reload gives the same A.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa.experts import LoRAPool, PoolSpec
from moa.experts.errors import UserError

from .base import Router, Routing, RoutingContext, register_router

CRITERIA = ("signed", "magnitude")


def layer_seed(seed: int, layer_name: str) -> int:
    """A 63-bit seed for one layer's projection, from the config seed and the layer's module path."""
    digest = hashlib.sha256(f"flylora/{int(seed)}/{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def nonzeros_per_row(in_features: int, rank: int, top_k: int) -> int:
    """FlyLoRA's ``p = d_in // (R // k)`` (sparsity k/R when k divides R)."""
    return in_features // max(rank // top_k, 1)


def sparse_projection(rank: int, in_features: int, top_k: int, seed: int) -> Tensor:
    """The frozen ``[R, d_in]`` projection: ``p`` random non-zeros per row, each N(0, 1/R^2), drawn on the CPU
    from ``seed`` alone (the same A on every device and whatever the global RNG state)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rank, in_features, generator=generator) / rank
    keep = torch.rand(rank, in_features, generator=generator).argsort(dim=1)[:, : nonzeros_per_row(in_features, rank, top_k)]
    mask = torch.zeros(rank, in_features, dtype=torch.bool).scatter_(1, keep, True)
    return values * mask


class FlyLoRAPool(LoRAPool):
    """``R`` rank-1 LoRA experts with a frozen sparse random ``lora_A`` and scaling ``alpha / R``.

    ``trainable_dense_A=True`` keeps PEFT's dense kaiming init and trains A (plain LoRA; for equivalence checks).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        top_k: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        impl: str = "auto",
        seed: int = 0,
        trainable_dense_A: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        if not 1 <= top_k <= rank:
            raise UserError(f"FlyLoRA needs 1 <= top_k <= rank, got top_k={top_k}, rank={rank}")
        super().__init__(in_features, out_features, rank, 1, None, dropout, impl, dtype=dtype, device=device)
        self.top_k, self.trainable_dense_A = top_k, trainable_dense_A
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank  # the total rank's alpha / r, not alpha / 1
        self.register_buffer("projection_seed", torch.tensor(seed, dtype=torch.int64, device=device))
        if not trainable_dense_A:
            with torch.no_grad():
                self.lora_A.copy_(sparse_projection(rank, in_features, top_k, seed))
            self.lora_A.requires_grad_(False)

    @property
    def rank(self) -> int:
        return self.n_experts

    def extra_repr(self) -> str:
        kind = "dense trainable A" if self.trainable_dense_A else f"frozen sparse A ({nonzeros_per_row(self.in_features, self.rank, self.top_k)} non-zeros per row)"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank} (rank-1 experts), "
            f"top_k={self.top_k}, alpha={self.alpha:g}, scaling={self.scaling:g}, {kind}, impl={self.impl!r}"
        )


@register_router
class FlyLoRARouter(Router):
    """FlyLoRA's implicit router: top-k of ``A x + d`` over the R rank-1 experts; no trainable parameters.

    Args:
        bias_u: step of the load-balancing bias update, ``d_i += u * sign(mean(c) - c_i)`` with ``c`` the number of
            real tokens that selected rank i since the last optimizer step (0.001 as in the published MMLU run).
        criterion: ``"signed"`` (top-k of ``y + d``; the PEFT path the released scripts run, so the one behind the
            published numbers, and the default) or ``"magnitude"`` (top-k of ``|y + d|``, the minimal reference file).
        seed: base seed of the projections; layer l uses :func:`layer_seed` ``(seed, l's module path)``. Use a
            different seed per task if the adapters are to be merged with near-orthogonal A's; merging by
            averaging (:func:`average_flylora`) needs the same seed.
        trainable_dense_A: plain dense trainable A (FlyLoRA reduces to LoRA when also ``top_k = R``).

    The bias update runs in :meth:`after_optimizer_step`, which ``moa.training_hooks.follow_optimizer`` calls
    after every step of a bound optimizer that holds this layer's B (``MoAModule`` binds its optimizers), or
    explicitly with :meth:`apply_balance_update`. Without either, the counts accumulate and ``d`` stays put.
    """

    name = "flylora"

    def __init__(
        self,
        in_features: int,
        n_experts: int,
        top_k: int,
        bias_u: float = 1e-3,
        criterion: str = "signed",
        seed: int = 0,
        trainable_dense_A: bool = False,
    ):
        super().__init__(in_features, n_experts, top_k)
        if criterion not in CRITERIA:
            raise UserError(f"FlyLoRA criterion must be one of {CRITERIA}, got {criterion!r}")
        if bias_u < 0:
            raise UserError(f"bias_u must be >= 0, got {bias_u}")
        self.bias_u, self.criterion, self.seed = float(bias_u), criterion, int(seed)
        self.trainable_dense_A = bool(trainable_dense_A)
        self.register_buffer("topk_bias", torch.zeros(n_experts))
        self.pending_counts: Tensor | None = None  # rank usage since the last optimizer step (training only)

    def build_pool(self, kind: str, spec: PoolSpec, shared: nn.ModuleDict) -> FlyLoRAPool:
        if kind != "lora":
            raise UserError(f"router 'flylora' builds its own rank-1 LoRA pool; expert_kind must be 'lora', got {kind!r}")
        if spec.r != spec.n_experts:
            raise UserError(
                f"FlyLoRA's experts are the r rank-1 components of one rank-r LoRA: set n_experts = r "
                f"(got n_experts={spec.n_experts}, r={spec.r})"
            )
        if spec.options:
            raise UserError(f"router 'flylora' takes no expert_options, got {sorted(spec.options)}")
        return FlyLoRAPool(
            spec.in_features, spec.out_features, spec.r, self.top_k, spec.alpha, spec.dropout, spec.impl,
            seed=layer_seed(self.seed, spec.name), trainable_dense_A=self.trainable_dense_A,
            dtype=spec.dtype, device=spec.device,
        )

    def forward(self, x: Tensor, ctx: RoutingContext, pool: nn.Module) -> Routing:
        if getattr(pool, "r", None) != 1 or getattr(pool, "n_experts", None) != self.n_experts:
            raise UserError(f"router 'flylora' needs a pool of {self.n_experts} rank-1 experts (see FlyLoRARouter.build_pool)")
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():  # selection is discrete; the kernel recomputes A x with its gradient
            y = F.linear(x2, pool.lora_A.to(x2.dtype)).float()
            score = y + self.topk_bias
            if self.criterion == "magnitude":
                score = score.abs()
            ids = score.topk(self.top_k, dim=-1).indices
        if self.training:
            self._count(ids, ctx, x.shape[:-1])
        return Routing(ids, x2.new_ones(ids.shape))

    @torch.no_grad()
    def _count(self, ids: Tensor, ctx: RoutingContext, lead: torch.Size) -> None:
        key = ("flylora-counted", id(self))
        if key in ctx.cache:  # the same forward call re-run by activation checkpointing: counted already
            return
        ctx.cache[key] = True
        if ctx.token_mask is not None:
            ids = ids[ctx.per_token("token_mask", lead).bool()]
        counts = torch.bincount(ids.reshape(-1), minlength=self.n_experts).to(self.topk_bias.dtype)
        self.pending_counts = counts if self.pending_counts is None else self.pending_counts + counts

    def after_optimizer_step(self, step: int, total_steps: int | None = None) -> None:
        """After a step of an optimizer holding this layer's B (see ``moa.training_hooks``)."""
        self.apply_balance_update()

    @torch.no_grad()
    def apply_balance_update(self) -> None:
        """``d += u * sign(mean(c) - c)`` with the counts since the last update, then reset them."""
        counts, self.pending_counts = self.pending_counts, None
        if counts is not None and self.bias_u > 0 and counts.sum() > 0:
            self.topk_bias += self.bias_u * torch.sign(counts.mean() - counts)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def extra_repr(self) -> str:
        return f"rank={self.n_experts}, top_k={self.top_k}, bias_u={self.bias_u:g}, criterion={self.criterion!r}, seed={self.seed}"


def _flylora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "router", None), FlyLoRARouter)}


@torch.no_grad()
def average_flylora(target: nn.Module, sources: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """Multi-task merge: set every FlyLoRA layer of ``target`` to the weighted mean of ``sources``' B and bias d.

    All models must share the frozen projections A (same ``seed``): A is the router, and averaging two different
    routers gives neither task's routing. ``weights`` default to the plain mean. ``target`` may be one of the
    sources (it is overwritten in place) and is returned.
    """
    if not sources:
        raise UserError("average_flylora needs at least one source model")
    weights = [1.0 / len(sources)] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        raise UserError(f"got {len(weights)} weights for {len(sources)} source models")
    layers = _flylora_layers(target)
    if not layers:
        raise UserError("the target model has no FlyLoRA layers")
    merged = {}
    for name, layer in layers.items():
        b_sum, d_sum = torch.zeros_like(layer.pool.lora_B), torch.zeros_like(layer.router.topk_bias)
        for i, (source, w) in enumerate(zip(sources, weights)):
            other = _flylora_layers(source).get(name)
            if other is None:
                raise UserError(f"source model {i} has no FlyLoRA layer {name!r}")
            if not torch.equal(other.pool.lora_A, layer.pool.lora_A):
                raise UserError(
                    f"source model {i} has a different projection A in layer {name!r}: only FlyLoRA adapters that "
                    f"share A (the same seed) can be averaged"
                )
            b_sum += w * other.pool.lora_B
            d_sum += w * other.router.topk_bias
        merged[name] = (b_sum, d_sum)
    for name, (b, d) in merged.items():
        layers[name].pool.lora_B.copy_(b)
        layers[name].router.topk_bias.copy_(d)
    return target
