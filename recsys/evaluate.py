"""Evaluation harness: any next-item scorer on a leave-one-out :class:`~moa.recsys.data.Stage`.

The interface every recommender implements (:class:`RecModel`), or a plain function (:data:`Scorer`)::

    score(histories: LongTensor [B, L] left-padded with 0, domain: str | None) -> Tensor [B, n_items + 1]

Column ``i`` scores item ``i`` of the stage's catalogue (the dataset the split came from: the whole catalogue, or
one domain's items re-indexed ``1..n_d``); column 0 (padding) is ignored. ``domain`` is ``stage.domain``: the
domain name for a domain dataset, None for the whole catalogue. Histories arrive on the CPU; a scorer moves them
to its own device.

Protocols (``evaluate(..., negatives=...)``):

* **full ranking** (default, the field's standard and RecBole's ``mode: full``): the target is ranked against
  every item of the catalogue. With ``mask_seen=True`` (default) the items in the user's history are excluded,
  except the target itself (RecBole excludes a user's history minus its positives). At test time the history
  contains the validation item, so it is masked too. RecBole's sequential models mask only the padding item;
  ``mask_seen=False`` reproduces that.
* **sampled, 1 positive + N negatives** (``negatives=99``; RecBole ``uni100``): the target is ranked against N
  items drawn uniformly (seeded) from the same candidates. The numbers are much higher than under full ranking
  and not comparable with them, so the result's ``protocol`` says which one was used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, runtime_checkable

import torch

from .data import PAD, Stage, left_pad
from .metrics import ranking_metrics, target_ranks
from moa.experts.errors import UserError, UserTypeError

Scorer = Callable[[torch.Tensor, "str | None"], torch.Tensor]
"""``score(histories [B, L] left-padded with 0, domain) -> scores [B, n_items + 1]``, higher = better."""


@runtime_checkable
class RecModel(Protocol):
    """What a recommender exposes to the harness (and to the benchmark tables).

    ``score`` must be a pure function of the histories (no training side effects); the harness calls it under
    ``torch.no_grad()`` and, for an ``nn.Module``, in eval mode.
    """

    def score(self, histories: torch.Tensor, domain: str | None = None) -> torch.Tensor:
        """Scores ``[B, n_items + 1]`` for left-padded histories ``[B, L]`` (0 = padding) of ``domain``."""
        ...


@dataclass(frozen=True)
class EvalResult:
    """Mean metrics of one stage under one protocol. ``result["NDCG@10"]`` reads a metric."""

    metrics: dict[str, float]
    protocol: str
    stage: str
    domain: str | None
    n_users: int
    ranks: torch.Tensor = field(repr=False)
    """Per-example 1-based rank of the target among its candidates."""

    def __getitem__(self, name: str) -> float:
        try:
            return self.metrics[name]
        except KeyError:
            raise KeyError(f"no metric {name!r}; have {list(self.metrics)}") from None

    def __str__(self) -> str:
        values = "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return f"[{self.stage}, {self.domain or 'catalogue'}, {self.protocol}, {self.n_users} users] {values}"


def as_scorer(model: RecModel | Scorer) -> Scorer:
    """A :data:`Scorer` from an object with ``score`` or a plain callable."""
    if isinstance(model, RecModel):
        return model.score
    if callable(model):
        return model
    raise UserTypeError(f"expected a RecModel (with .score) or a callable scorer, got {type(model).__name__}")


def trainable_parameters(model: object) -> int:
    """Number of trainable parameters of an ``nn.Module`` (0 for anything else, e.g. :class:`Popularity`)."""
    if not isinstance(model, torch.nn.Module):
        return 0
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def candidate_mask(histories: Iterable[torch.Tensor], targets: torch.Tensor, n_items: int,
                   mask_seen: bool = True) -> torch.Tensor:
    """Bool ``[B, n_items + 1]``: the items each row is ranked against (never padding; with ``mask_seen`` not the
    history's items, the target excepted)."""
    histories = list(histories)
    allowed = torch.ones(len(histories), n_items + 1, dtype=torch.bool)
    if mask_seen:
        allowed.scatter_(1, left_pad(histories), False)
    allowed[:, PAD] = False
    allowed[torch.arange(len(histories)), targets] = True
    return allowed


def evaluate(model: RecModel | Scorer, stage: Stage, *, ks: Iterable[int] = (10, 20), batch_size: int = 256,
             max_len: int | None = 50, mask_seen: bool = True, negatives: int | None = None,
             seed: int = 0) -> EvalResult:
    """HR@K, NDCG@K and MRR@K of ``model`` on ``stage`` (e.g. ``split.test``), for every K in ``ks``.

    Args:
        model: a :class:`RecModel` or a :data:`Scorer`.
        stage: the histories and targets to evaluate.
        batch_size: users per ``score`` call.
        max_len: the model input keeps the most recent ``max_len`` items (RecBole ``MAX_ITEM_LIST_LENGTH: 50``);
            None = the whole history. Masking always uses the whole history.
        mask_seen: exclude already-seen items from the ranking (see the module docstring).
        negatives: None = full ranking; N = the sampled protocol, 1 positive + N uniform negatives (fewer when a
            row has fewer candidates), seeded by ``seed``.
    """
    if len(stage) == 0:
        raise UserError(f"stage {stage.name!r} has no examples")
    if negatives is not None and negatives < 1:
        raise UserError(f"negatives must be >= 1 or None (full ranking), got {negatives}")
    ks = tuple(ks)
    scorer = as_scorer(model)
    module = model if isinstance(model, torch.nn.Module) else getattr(scorer, "__self__", None)
    was_training = isinstance(module, torch.nn.Module) and module.training
    if was_training:
        module.eval()
    generator = torch.Generator().manual_seed(seed)
    ranks = []
    try:
        with torch.no_grad():
            for histories, targets, rows in stage.batches(batch_size, max_len):
                scores = scorer(histories, stage.domain)
                expected = (len(targets), stage.n_items + 1)
                if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
                    got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                    raise UserError(f"scorer returned {got}; expected [B, n_items + 1] = {expected} "
                                     f"(column i = item i, column 0 = padding)")
                scores = scores.detach().float().cpu()
                allowed = candidate_mask([stage.histories[r] for r in rows.tolist()], targets, stage.n_items,
                                         mask_seen)
                if negatives is None:
                    ranks.append(target_ranks(scores, targets, allowed))
                else:
                    ranks.append(_sampled_ranks(scores, targets, allowed, negatives, generator))
    finally:
        if was_training:
            module.train()
    ranks = torch.cat(ranks)
    if negatives is None:
        protocol = f"full ranking over {stage.n_items} items" + (", seen masked" if mask_seen else "")
    else:
        protocol = f"SAMPLED 1+{negatives} uniform" + (", seen excluded" if mask_seen else "")
    return EvalResult(ranking_metrics(ranks, ks), protocol, stage.name, stage.domain, len(ranks), ranks)


def _sampled_ranks(scores: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor, negatives: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Rank each target among itself and up to ``negatives`` distinct uniform draws from its allowed items."""
    rows = torch.arange(len(targets))
    keys = torch.rand(allowed.shape, generator=generator)
    keys[~allowed] = -1.0
    keys[rows, targets] = -1.0
    k = min(negatives, allowed.shape[1])
    drawn_keys, drawn = keys.topk(k, dim=1)   # top-k of iid uniform keys = a uniform sample without replacement
    sub_scores = torch.cat([scores[rows, targets][:, None], scores.gather(1, drawn)], dim=1)
    sub_allowed = torch.cat([torch.ones(len(targets), 1, dtype=torch.bool), drawn_keys >= 0], dim=1)
    return target_ranks(sub_scores, torch.zeros_like(targets), sub_allowed)
