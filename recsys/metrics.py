"""Ranking metrics for leave-one-out next-item recommendation (one relevant item per user).

With a single held-out item at (1-based) rank ``r``, RecBole's top-K definitions reduce to

* ``HR@K   = 1[r <= K]``                    (RecBole ``Hit``; equals Recall@K here)
* ``NDCG@K = 1[r <= K] / log2(r + 1)``      (RecBole ``NDCG``; the ideal DCG is 1)
* ``MRR@K  = 1[r <= K] / r``                (RecBole ``MRR``)

each averaged over users. Ranks are computed from scores by :func:`target_ranks`, with ties counted
**against** the target (``r = #candidates scoring >= the target``): deterministic, and a constant scorer gets the
worst rank instead of a perfect one. RecBole takes ``torch.topk``, whose order among tied scores is unspecified.
"""

from __future__ import annotations

from typing import Iterable

import torch

from moa.experts.errors import UserError

METRICS = ("HR", "NDCG", "MRR")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each row's target among that row's candidates (ties and NaN scores count against the
    target; a NaN target score is refused).

    Args:
        scores: ``[B, C]`` scores, higher is better.
        targets: ``[B]`` column of the relevant item in each row.
        candidates: optional bool ``[B, C]``; False columns are excluded from the ranking. The target column must
            be a candidate.
    Returns:
        LongTensor ``[B]`` with values in ``1..C``.
    """
    if scores.dim() != 2:
        raise UserError(f"scores must be [B, C], got shape {tuple(scores.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=scores.device)
    if targets.shape != scores.shape[:1]:
        raise UserError(f"targets must be [B={scores.shape[0]}], got shape {tuple(targets.shape)}")
    if bool(((targets < 0) | (targets >= scores.shape[1])).any()):
        raise UserError(f"targets must index the {scores.shape[1]} score columns")
    target_scores = scores.gather(1, targets[:, None])
    at_least = (scores >= target_scores) | torch.isnan(scores)  # a NaN candidate ranks above the target, never below
    if candidates is not None:
        if candidates.shape != scores.shape:
            raise UserError(f"candidates must be [B, C] = {tuple(scores.shape)}, got {tuple(candidates.shape)}")
        if not bool(candidates.gather(1, targets[:, None]).all()):
            raise UserError("a target is not among its row's candidates (was it masked as already seen?)")
        at_least &= candidates
    if bool(torch.isnan(target_scores).any()):
        raise UserError("NaN score for a target item")
    return at_least.sum(1)


def hit_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Per-user HR@K: 1.0 when the target is in the top K."""
    return (ranks <= k).float()


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Per-user NDCG@K with one relevant item: ``1 / log2(rank + 1)`` inside the top K, else 0."""
    ranks = ranks.double()
    return torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks)).float()


def mrr_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Per-user MRR@K: ``1 / rank`` inside the top K, else 0."""
    ranks = ranks.double()
    return torch.where(ranks <= k, 1.0 / ranks, torch.zeros_like(ranks)).float()


def ranking_metrics(ranks: torch.Tensor, ks: Iterable[int] = (10, 20)) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR@K over users for every K: ``{"HR@10": ..., "NDCG@10": ..., "MRR@10": ...}``."""
    ranks = torch.as_tensor(ranks)
    if ranks.numel() == 0:
        raise UserError("no ranks to average")
    out = {}
    for k in ks:
        out[f"HR@{k}"] = hit_at_k(ranks, k).mean().item()
        out[f"NDCG@{k}"] = ndcg_at_k(ranks, k).mean().item()
        out[f"MRR@{k}"] = mrr_at_k(ranks, k).mean().item()
    return out
