"""The text-based sequential recommender (:class:`TextSeqRecommender`) and its configuration.

* :class:`RecommenderConfig`: the hyper-parameters (saved as JSON with the model); :func:`replace_config` a copy
  with some of them changed.
* :class:`TextSeqRecommender`: one item encoder (:class:`~moa.recsys.encoders.ItemEncoder`, a pool of domain
  experts) and one user encoder (:class:`~moa.recsys.encoders.UserEncoder`) per domain. It follows the harness
  interface ``score(histories [B, L], domain) -> [B, n_items + 1]``; ``recommend(histories, domain, k)`` serves.
  Each domain has its own catalogue (items indexed ``1..n_d``, 0 = padding), as :mod:`moa.recsys.data` makes them;
  :func:`~moa.recsys.encoders.tokenize_items` turns the texts into token ids once.

The model's other roles live in their own modules and are bound here as methods: ``fit`` / ``batch_loss`` are
:func:`moa.recsys.trainer.fit` / :func:`~moa.recsys.trainer.batch_loss`, ``save`` / ``load_weights`` are
:func:`moa.recsys.persistence.save_recommender` / :func:`~moa.recsys.persistence.load_weights`; a saved folder is
read back by :func:`moa.recsys.loading.load_recommender`. X-Cross (:mod:`moa.recsys.xcross`) plugs in its own
item encoder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import persistence, trainer
from .data import PAD, left_pad
from .encoders import ItemEncoder, UserEncoder, load_encoder, plain_copy, tokenize_items
from moa.experts.errors import UserError


@dataclass
class RecommenderConfig:
    """Hyper-parameters of :class:`TextSeqRecommender` (saved as JSON with the model).

    ``encoder`` is the path of the transformers item encoder (None: all-MiniLM-L6-v2, or the model object given to
    the constructor). ``adapted_layers`` top encoder layers carry MoA pools on ``target_modules`` (rank ``r``,
    ``alpha``); 0 freezes the encoder. The user encoder: ``hidden``, ``user_layers``, ``heads``, ``inner``,
    ``dropout``, histories of at most ``max_len`` items. ``max_tokens`` per item text. ``item_ids`` fuses a learnt
    item-ID vector with each item's text vector (for the items of the training data; ``id_dropout`` drops it at
    random in training).
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
    item_ids: bool = False
    id_dropout: float = 0.0

    def __post_init__(self):
        if self.adapted_layers < 0:
            raise UserError(f"adapted_layers must be >= 0, got {self.adapted_layers}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise UserError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.hidden % self.heads:
            raise UserError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        self.target_modules = list(self.target_modules)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RecommenderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown RecommenderConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)



def replace_config(config: RecommenderConfig, **changes) -> RecommenderConfig:
    data = asdict(config)
    data.update(changes)
    return RecommenderConfig.from_dict(data)


class TextSeqRecommender(nn.Module):
    """Text-based sequential recommender: one item encoder (with a pool of domain experts) and one user encoder per
    domain. Follows the harness interface ``score(histories [B, L], domain) -> [B, n_items + 1]``.

    Build it with :meth:`build` (an encoder path or model, domains, catalogues), train with :meth:`fit`, serve with
    :meth:`recommend`, persist with :meth:`save` / :func:`moa.recsys.loading.load_recommender`.
    """

    def __init__(self, item_encoder: ItemEncoder, domains: Sequence[str], config: RecommenderConfig):
        super().__init__()
        if not domains or len(set(domains)) != len(domains):
            raise UserError(f"domains must be distinct names, got {list(domains)}")
        self.config = config
        self.domains = list(domains)
        self.item_encoder = item_encoder
        self.heads = nn.ModuleList(  # one user encoder per domain, in the order of ``domains``
            UserEncoder(item_encoder.hidden_size, config.hidden, config.user_layers, config.heads, config.inner,
                        config.dropout, config.max_len, config.id_dropout)
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
                raise UserError("catalogue texts need a tokenizer (pass tokenizer=..., or token ids via add_catalogue)")
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
            raise UserError("from_experts needs at least one single-domain model")
        domains = list(models)
        first = models[domains[0]]
        for domain, model in models.items():
            if model.domains != [domain] or model.item_encoder.kind != "text" or model.item_encoder.n_experts != 1:
                raise UserError(f"models[{domain!r}] must be a one-domain recommender of domain {domain!r} with one "
                                 f"expert; it serves {model.domains} with {model.item_encoder.n_experts} experts")
            if asdict(model.config) != asdict(first.config):
                raise UserError(f"models[{domain!r}] has another configuration than models[{domains[0]!r}]")
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
                merged.add_catalogue(domain, *source.item_encoder.catalogues[domain])
                merged.heads[e].load_state_dict(source.heads[0].state_dict())
                encoder.share_cache(source.item_encoder, domain)
        return merged.train(first.training)

    # -- catalogues and item vectors
    def add_catalogue(self, domain: str, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Token ids ``[n_items + 1, T]`` of ``domain``'s items (see :func:`tokenize_items`)."""
        index = self._domain_index(domain)
        self.item_encoder.add_catalogue(domain, input_ids, attention_mask)
        if self.config.item_ids:
            self.heads[index].use_item_ids(self.item_encoder.n_items(domain))
        self.clear_cache()

    def _domain_index(self, domain: str | int | None) -> int:
        if domain is None:
            if len(self.domains) != 1:
                raise UserError(f"this recommender serves several domains {self.domains}: name one")
            return 0
        if isinstance(domain, int) and not isinstance(domain, bool):
            if not 0 <= domain < len(self.domains):
                raise UserError(f"domain index {domain} out of range for domains {self.domains}")
            return domain
        try:
            return self.domains.index(domain)
        except ValueError:
            raise UserError(f"unknown domain {domain!r}; this recommender serves {self.domains}") from None

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
            raise UserError(f"cached item table of domain {domain!r} has shape {tuple(table.shape)}; expected [{n + 1}, d]")
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
            raise UserError(f"histories must be [B, L] item indices (left-padded with 0), got {tuple(histories.shape)}")
        n = self.item_encoder.n_items(domain)
        if histories.numel() and (int(histories.min()) < 0 or int(histories.max()) > n):
            raise UserError(f"item indices of domain {domain!r} must lie in 0..{n} (0 = padding)")
        return histories[:, -self.config.max_len:].to(self.item_encoder.device)

    # -- training (moa.recsys.trainer)
    fit = trainer.fit
    batch_loss = trainer.batch_loss

    # -- bookkeeping
    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters: ``{"encoder": item-encoder adapters, "heads": user encoders, "total": both}``."""
        encoder = sum(p.numel() for p in self.item_encoder.trainable_parameters())
        heads = sum(p.numel() for p in self.heads.parameters() if p.requires_grad)
        return {"encoder": encoder, "heads": heads, "total": encoder + heads}

    # -- persistence (moa.recsys.persistence)
    save = persistence.save_recommender
    load_weights = persistence.load_weights
