"""X-Cross: layer-wise integration of frozen domain LoRA experts for a new (target) domain.

Hadad et al., "X-Cross: Dynamic Integration of Language Models for Cross-Domain Sequential Recommendation",
SIGIR 2025 (no public code; equations from ``shared/reference/algorithms.md`` section 5). For a target domain,
the n source-domain models (the pretrained encoder plus source expert m, m = 1..n) run in lock-step:

* **streams, batched**: the items are stacked n times along the batch dimension (stream-major) and the adapted
  layers carry a pool of the n frozen source experts with ``router="xcross"`` (stream m -> expert m), so the
  n source models are one forward pass through the grouped kernels, not n models.
* **integration at every adapted layer** (a forward hook on each layer module): with ``h_m`` the layer's output
  for stream m and ``z = W_l [h_1; ...; h_n] / sqrt(n d) + b_l`` (per token, ``2n(n-1)`` scalars; the fixed
  ``1/sqrt(n d)`` only sets the scale an optimizer step has on z),

      h~_m = h_m + sum_{m' != m} ( beta * z[m, m'] * h_m'  +  gamma * z'[m, m'] * (h_m - h_m') ),

  and ``h~_m`` feeds the next layer of stream m.
* **final weighting**: ``h = sum_m w_m h~_m`` after the last layer, then mean pooling (the item vector).

Only the integrator (``W_l``, ``b_l`` per layer, ``w``) trains; the source experts are frozen (the user encoder
of the target domain trains too; it is the recommender's scoring head). ``W_l, b_l`` start at zero and
``w = 1/n``, so training starts from the average of the n source models; with ``W = 0`` and ``w`` one-hot on
source m the output is exactly source m's own model (tested).

The lower encoder layers carry no experts (see :class:`moa.recsys.encoders.ItemEncoder`): all streams are identical
there, so the integration runs at every layer where the streams differ (the adapted layers), on top of the cached
frozen layers. A saved X-Cross recommender is read back by :func:`moa.recsys.loading.load_recommender`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .encoders import ItemEncoder, mean_pool, plain_copy
from .recommender import TextSeqRecommender, replace_config
from moa.experts.errors import UserError


class XCrossIntegrator(nn.Module):
    """The trainable part of X-Cross: per-layer scaling networks ``W_l`` and the final stream weights ``w``."""

    def __init__(self, n_streams: int, hidden_size: int, n_layers: int, beta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        if n_streams < 2:
            raise UserError(f"X-Cross integrates at least 2 source streams, got {n_streams}")
        self.n, self.beta, self.gamma = n_streams, float(beta), float(gamma)
        # z = W_l h_cat with W_l = scaling.weight / sqrt(n d): the same function class, but an optimizer step of
        # size lr on a weight moves z by O(lr) (as on the bias) instead of O(lr * n * d * |h|)
        self.input_scale = 1.0 / math.sqrt(n_streams * hidden_size)
        pairs = 2 * n_streams * (n_streams - 1)
        self.scaling = nn.ModuleList(nn.Linear(n_streams * hidden_size, pairs) for _ in range(n_layers))
        for linear in self.scaling:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.stream_weights = nn.Parameter(torch.full((n_streams,), 1.0 / n_streams))
        eye = torch.eye(n_streams, dtype=torch.bool)
        self.register_buffer("off_diagonal", (~eye).reshape(-1).nonzero().squeeze(1), persistent=False)

    def refine(self, layer: int, streams: Tensor) -> Tensor:
        """``[n, ..., d]`` layer outputs of the n streams -> refined ``h~`` (same shape)."""
        n = self.n
        lead = streams.shape[1:-1]
        tokens = streams.movedim(0, -2)                       # [..., n, d]
        z = self.scaling[layer](tokens.reshape(*lead, -1) * self.input_scale)  # [..., 2 n (n-1)]
        z = z.view(*lead, 2, n * (n - 1))
        mixing = tokens.new_zeros(*lead, 2, n * n)
        mixing[..., self.off_diagonal] = z                    # [..., 2, n*n], zero diagonal
        direct, difference = mixing.view(*lead, 2, n, n).unbind(-3)
        # sum_{m'} D[m,m'] h_m'  and  sum_{m'} C[m,m'] (h_m - h_m') = rowsum(C)_m h_m - sum_{m'} C[m,m'] h_m'
        mixed = direct @ tokens
        contrast = difference.sum(-1, keepdim=True) * tokens - difference @ tokens
        refined = tokens + self.beta * mixed + self.gamma * contrast
        return refined.movedim(-2, 0)

    def combine(self, streams: Tensor) -> Tensor:
        """``sum_m w_m h~_m``: ``[n, ..., d] -> [..., d]``."""
        return torch.tensordot(self.stream_weights.to(streams.dtype), streams, dims=1)

    def extra_repr(self) -> str:
        return f"streams={self.n}, beta={self.beta:g}, gamma={self.gamma:g}"


class XCrossItemEncoder(ItemEncoder):
    """Item encoder that runs n frozen source experts as lock-step streams and integrates them (X-Cross).

    Build it from a trained domain-expert model with :meth:`from_sources`; ``domain`` arguments are ignored
    (every item goes through all n streams).
    """

    kind = "xcross"

    def __init__(self, backbone: nn.Module, sources: Sequence[str], adapted_layers: int, r: int = 8,
                 alpha: float = 16.0, target_modules: Sequence[str] = ("query", "value"), impl: str = "auto",
                 beta: float = 1.0, gamma: float = 1.0):
        if adapted_layers < 1:
            raise UserError("X-Cross needs adapted layers (the source experts live there)")
        super().__init__(backbone, len(sources), adapted_layers, r, alpha, target_modules, impl, router="xcross",
                         router_options={}, expert_names=list(sources))
        self.sources = list(sources)
        for p in self.top.parameters():  # the source experts are frozen; only the integrator trains
            p.requires_grad_(False)
        self.integrator = XCrossIntegrator(len(sources), self.hidden_size, adapted_layers, beta, gamma)
        self._streaming = False  # the hooks act only inside run_top (not when the shared layers run otherwise)
        self._hooks = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.top.model.layers)]

    def _hook(self, index: int):
        def refine(module: nn.Module, args: Any, output: Any):
            if not self._streaming:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            streams = hidden.view(self.integrator.n, -1, *hidden.shape[1:])
            refined = self.integrator.refine(index, streams).reshape(hidden.shape)
            return (refined, *output[1:]) if isinstance(output, tuple) else refined

        return refine

    @classmethod
    def from_sources(cls, model: TextSeqRecommender, sources: Sequence[str], beta: float = 1.0,
                     gamma: float = 1.0) -> "XCrossItemEncoder":
        """Copy the pretrained encoder and the experts of ``sources`` (domains of ``model``) into a new X-Cross
        encoder; ``model`` itself is left unchanged."""
        encoder = model.item_encoder
        if encoder.top is None or encoder.kind != "text":
            raise UserError("X-Cross needs a domain-expert recommender (TextSeqRecommender.build(..., experts=True))")
        if len(set(sources)) != len(sources):
            raise UserError(f"sources must be distinct domains, got {list(sources)}")
        expert_ids = [model._domain_index(s) for s in sources]
        config = model.config
        new = cls(plain_copy(encoder.backbone), sources, config.adapted_layers, config.r, config.alpha,
                  config.target_modules, config.impl, beta, gamma)
        new.to(encoder.device)
        source_layers, layers = encoder.top.moa_layers(), new.top.moa_layers()
        with torch.no_grad():
            for name, layer in layers.items():
                pool = source_layers[name].pool
                layer.pool.A.copy_(pool.A[expert_ids])
                layer.pool.lora_B.copy_(pool.B[expert_ids].permute(1, 0, 2).reshape(pool.out_features, -1))
                if layer.pool.scaling != pool.scaling:
                    raise UserError("source and X-Cross pools disagree on the LoRA scaling")
        return new

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.integrator.parameters() if p.requires_grad]

    def run_top(self, hidden: Tensor, mask: Tensor, expert_ids: Tensor | None) -> Tensor:
        n = self.integrator.n
        self._streaming = True
        try:
            out = self.top(hidden_states=hidden.repeat(n, 1, 1), attention_mask=mask.repeat(n, 1))
        finally:
            self._streaming = False
        final = self.integrator.combine(out.view(n, *hidden.shape))
        return mean_pool(final, mask)

    def encode_many(self, requests):
        return super().encode_many([(name, items, 0) for name, items, _ in requests])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "sources": self.sources, "beta": self.integrator.beta, "gamma": self.integrator.gamma}

    def adapter_state(self) -> dict[str, Tensor]:
        state = super().adapter_state()
        state.update({f"integrator.{k}": v for k, v in self.integrator.state_dict().items()})
        return state

    def load_adapter_state(self, state) -> None:
        integrator = {k[len("integrator."):]: v for k, v in state.items() if k.startswith("integrator.")}
        super().load_adapter_state({k: v for k, v in state.items() if not k.startswith("integrator.")})
        self.integrator.load_state_dict(integrator, strict=True)


def build_xcross(model: TextSeqRecommender, target: str, sources: Sequence[str] | None = None,
                 catalogue: tuple[Tensor, Tensor] | None = None, *, beta: float = 1.0, gamma: float = 1.0,
                 head_from: str | None = None) -> TextSeqRecommender:
    """An X-Cross recommender for domain ``target`` from the frozen experts of ``sources`` in ``model``.

    ``sources`` default to every domain of ``model`` except ``target``. ``catalogue`` is the target's token ids
    ``(input_ids, attention_mask)`` (see :func:`moa.recsys.encoders.tokenize_items`); it may be omitted when
    ``model`` already has a catalogue named ``target``. The target's user encoder starts fresh, or as a copy of
    source ``head_from``'s. Train it with ``fit`` (the integrator and the user encoder train).
    """
    sources = [d for d in model.domains if d != target] if sources is None else list(sources)
    if target in sources:
        raise UserError(f"the target domain {target!r} cannot be one of its own sources")
    encoder = XCrossItemEncoder.from_sources(model, sources, beta, gamma)
    xmodel = TextSeqRecommender(encoder, [target], replace_config(model.config))
    if catalogue is None:
        if target not in model.item_encoder.catalogues:
            raise UserError(f"no catalogue for the target {target!r}: pass catalogue=(input_ids, attention_mask)")
        catalogue = model.item_encoder.catalogues[target]
    xmodel.add_catalogue(target, *catalogue)
    known = model.item_encoder.catalogues.get(target)
    if known is not None and torch.equal(known[0], catalogue[0].cpu()):
        encoder.share_cache(model.item_encoder, target)  # the frozen layers are the same: reuse their output
    if head_from is not None:
        xmodel.head(target).load_state_dict(model.head(head_from).state_dict())
    return xmodel.to(encoder.device)
