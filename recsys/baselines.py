"""Baselines in the shared harness: item popularity and an ID-based SASRec.

Both follow :class:`moa.recsys.evaluate.RecModel` (``score(histories [B, L], domain) -> [B, n_items + 1]``) and
are fitted on a :class:`moa.recsys.data.LeaveOneOut` split (its training users only)::

    split = ml100k().domain("comedy").leave_one_out()
    model = SASRec(split.n_items)
    model.fit(split, epochs=200)              # early-stops on validation NDCG@10, keeps the best weights
    print(evaluate(model, split.test))
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import PAD, LeaveOneOut, training_windows
from .layers import SequenceEncoder, init_weights, linear_cross_entropy
from .trainer import train
from moa.experts.errors import UserError


class Popularity:
    """Scores every item by how often it occurs in the training sequences (the same list for every user)."""

    def __init__(self):
        self.counts: torch.Tensor | None = None

    def fit(self, split: LeaveOneOut) -> "Popularity":
        self.counts = split.item_counts().float()
        return self

    def score(self, histories: torch.Tensor, domain: str | None = None) -> torch.Tensor:
        if self.counts is None:
            raise RuntimeError("Popularity.score before fit(split)")
        return self.counts.expand(histories.shape[0], -1)


class SASRec(SequenceEncoder):
    """Self-attentive sequential recommendation over item-ID embeddings (Kang & McAuley, ICDM 2018).

    The shared causal :class:`~moa.recsys.layers.SequenceEncoder` over the history's item embeddings (the most
    recent item always sits at position ``max_len - 1``); an item's score is the dot product of the last
    position's output with its (tied) embedding. Defaults follow RecBole's SASRec (2 layers, 2 heads, hidden 64,
    inner 256, ``MAX_ITEM_LIST_LENGTH`` 50, init N(0, 0.02)) with dropout 0.2 (RecBole's advice for dense
    MovieLens) and pre-LayerNorm blocks (``block="paper"``: SASRec+'s pmixer blocks, see the encoder). Trained
    with full softmax cross-entropy by default (SASRec+, RecSys'23).
    """

    def __init__(self, n_items: int, hidden: int = 64, n_layers: int = 2, n_heads: int = 2, inner: int = 256,
                 dropout: float = 0.2, max_len: int = 50, block: str = "moa"):
        super().__init__(hidden, n_layers, n_heads, inner, dropout, max_len, block)
        self.n_items = n_items
        self.item_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=PAD)
        init_weights(self.item_embedding)

    def forward(self, histories: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, hidden]`` for left-padded histories ``[B, L]`` (only the last ``max_len`` kept).

        Position t attends to the real items at positions <= t; padding positions attend only to themselves
        (their outputs are meaningless and never used).
        """
        if histories.dim() != 2:
            raise UserError(f"histories must be [B, L] item indices, got shape {tuple(histories.shape)}")
        device = self.item_embedding.weight.device
        histories = histories[:, -self.max_len:].to(device)
        if bool(((histories < 0) | (histories > self.n_items)).any()):
            raise UserError(f"item indices must be in 0..{self.n_items} (0 = padding)")
        return self.encode(self.item_embedding(histories), histories != PAD)

    def score(self, histories: torch.Tensor, domain: str | None = None) -> torch.Tensor:
        """Next-item scores ``[B, n_items + 1]`` (column 0, padding, is -inf)."""
        logits = self(histories)[:, -1] @ self.item_embedding.weight.T
        logits[:, PAD] = -math.inf
        return logits

    def fit(self, split: LeaveOneOut, epochs: int = 200, *, lr: float = 3e-3, batch_size: int = 256,
            weight_decay: float = 0.0, negatives: int | None = None, patience: int = 5, seed: int = 0,
            max_seconds: float | None = None, log: Callable[[str], None] | None = None,
            progress: bool = True, by_length: bool = False) -> list[dict]:
        """Train on the split's training sequences with the shared loop (:func:`moa.recsys.trainer.train`): the
        same windows, random batches, early stopping on validation NDCG@10 and best-weight selection as the text
        recommender. Loss: cross-entropy over all items (``negatives=None``), or a sampled softmax against
        ``negatives`` uniform items shared by the batch; ``progress`` shows a bar over the epochs; ``by_length``
        batches windows of similar length (less padding to encode at a long ``max_len``). Returns one dict per
        trained epoch.
        The defaults (Adam, lr 3e-3, batch 256, patience 5) were chosen on ml-100k validation NDCG@10: they match
        lr 1e-3 / batch 128 and dropout 0.5 within noise and converge in the fewest epochs.
        """
        if split.n_items != self.n_items:
            raise UserError(f"model has {self.n_items} items, split has {split.n_items}")
        groups = [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]
        result = train(self, {split.domain: split}, groups, functools.partial(self.batch_loss, negatives=negatives),
                       max_len=self.max_len, epochs=epochs, batch_size=batch_size, weight_decay=weight_decay,
                       patience=patience, seed=seed, keep_start=False, max_seconds=max_seconds, log=log,
                       progress=progress, by_length=by_length)
        return result["history"][1:]

    def batch_loss(self, batch: dict, windows: dict, generator: torch.Generator, trained: dict,
                   negatives: int | None = None) -> tuple[torch.Tensor, int]:
        """Mean next-item loss and the number of predictions of the windows ``batch`` selects (one domain)."""
        (domain, rows), = batch.items()
        device = self.item_embedding.weight.device
        x, y = windows[domain][0][rows], windows[domain][1][rows]
        width = int((x != PAD).sum(1).max())   # padding-only columns change nothing
        x, y = x[:, -width:].to(device), y[:, -width:].to(device)
        hidden = self(x)[y != PAD]
        y = y[y != PAD]
        return self._loss(hidden, y, negatives, trained[domain].to(device), generator), len(y)

    def _windows(self, split: LeaveOneOut) -> tuple[torch.Tensor, torch.Tensor]:
        """Training windows: inputs and next-item targets ``[W, <= max_len]``, left-padded with 0."""
        return training_windows(split.train_sequences, self.max_len)

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor, negatives: int | None, trained: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
        # the softmax ranges over the items of the training data: held-out (cold-start) items keep their initial
        # embedding, as a new item would
        table = self.item_embedding.weight
        if negatives is None:   # a softmax over the trained items (targets are trained items)
            items = trained.nonzero().squeeze(1)
            column = torch.zeros(len(trained), dtype=torch.long, device=items.device)
            column[items] = torch.arange(len(items), device=items.device)
            return linear_cross_entropy(hidden, table[items], column[targets])
        pool = trained.nonzero().squeeze(1)
        sampled = pool[torch.randint(0, len(pool), (negatives,), generator=generator).to(pool.device)]
        positive = (hidden * table[targets]).sum(-1, keepdim=True)
        negative = hidden @ table[sampled].T
        negative = negative.masked_fill(sampled[None, :] == targets[:, None], -math.inf)
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))
