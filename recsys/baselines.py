"""Baselines in the shared harness: item popularity and an ID-based SASRec.

Both follow :class:`moa.recsys.evaluate.RecModel` (``score(histories [B, L], domain) -> [B, n_items + 1]``) and
are fitted on a :class:`moa.recsys.data.LeaveOneOut` split (its training users only)::

    split = ml100k().domain("comedy").leave_one_out()
    model = SASRec(split.n_items)
    model.fit(split, epochs=200)              # early-stops on validation NDCG@10, keeps the best weights
    print(evaluate(model, split.test))
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import PAD, LeaveOneOut, training_windows
from .evaluate import evaluate
from .layers import TransformerBlock, look_back_mask


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


class SASRec(nn.Module):
    """Self-attentive sequential recommendation over item-ID embeddings (Kang & McAuley, ICDM 2018).

    Causal self-attention over the (left-padded) history with learned absolute positions (the most recent item
    always sits at position ``max_len - 1``); an item's score is the dot product of the last position's output
    with its (tied) input embedding. Defaults follow RecBole's SASRec (2 layers, 2 heads, hidden 64, inner 256,
    ``MAX_ITEM_LIST_LENGTH`` 50, init N(0, 0.02)) with dropout 0.2 (RecBole's advice for dense MovieLens) and
    pre-LayerNorm blocks.
    """

    def __init__(self, n_items: int, hidden: int = 64, n_layers: int = 2, n_heads: int = 2, inner: int = 256,
                 dropout: float = 0.2, max_len: int = 50):
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by n_heads ({n_heads})")
        self.n_items, self.max_len = n_items, max_len
        self.item_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=PAD)
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.input_norm, self.input_dropout = nn.LayerNorm(hidden), nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, n_heads, inner, dropout) for _ in range(n_layers))
        self.output_norm = nn.LayerNorm(hidden)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def forward(self, histories: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, hidden]`` for left-padded histories ``[B, L]`` (only the last ``max_len`` kept).

        Position t attends to the real items at positions <= t; padding positions attend only to themselves
        (their outputs are meaningless and never used).
        """
        if histories.dim() != 2:
            raise ValueError(f"histories must be [B, L] item indices, got shape {tuple(histories.shape)}")
        device = self.item_embedding.weight.device
        histories = histories[:, -self.max_len:].to(device)
        if bool(((histories < 0) | (histories > self.n_items)).any()):
            raise ValueError(f"item indices must be in 0..{self.n_items} (0 = padding)")
        length = histories.shape[1]
        positions = torch.arange(self.max_len - length, self.max_len, device=device)
        x = self.input_dropout(self.input_norm(self.item_embedding(histories) + self.position_embedding(positions)))
        allowed = look_back_mask(histories != PAD)
        for block in self.blocks:
            x = block(x, allowed)
        return self.output_norm(x)

    def score(self, histories: torch.Tensor, domain: str | None = None) -> torch.Tensor:
        """Next-item scores ``[B, n_items + 1]`` (column 0, padding, is -inf)."""
        logits = self(histories)[:, -1] @ self.item_embedding.weight.T
        logits[:, PAD] = -math.inf
        return logits

    def fit(self, split: LeaveOneOut, epochs: int = 200, *, lr: float = 3e-3, batch_size: int = 256,
            weight_decay: float = 0.0, negatives: int | None = None, patience: int = 5, seed: int = 0,
            log: Callable[[str], None] | None = None) -> list[dict]:
        """Train on the split's training sequences; early-stop on validation NDCG@10; keep the best weights.

        Each training sequence is cut, from its end, into windows of ``max_len + 1`` items (input = all but the
        last, target at every position = the next item), so every training transition is used once per epoch.
        Loss: cross-entropy over all items (``negatives=None``), or a sampled softmax against ``negatives``
        uniform items shared by the batch. Validation is the harness (full ranking, seen items masked) after each
        epoch; training stops after ``patience`` epochs without improvement. Returns one dict per epoch.
        The defaults (Adam, lr 3e-3, batch 256, patience 5) were chosen on ml-100k validation NDCG@10: they match
        lr 1e-3 / batch 128 and dropout 0.5 within noise and converge in the fewest epochs.
        """
        if split.n_items != self.n_items:
            raise ValueError(f"model has {self.n_items} items, split has {split.n_items}")
        torch.manual_seed(seed)
        inputs, targets = self._windows(split)
        if len(inputs) == 0:
            raise ValueError("no training transitions: every training sequence has fewer than 2 items")
        optimizer = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        device = self.item_embedding.weight.device
        # the softmax ranges over the items of the training data: held-out (cold-start) items keep their initial
        # embedding, as a new item would
        trained = (split.item_counts() > 0).to(device)
        best, best_state, stale, history = -1.0, None, 0, []
        for epoch in range(epochs):
            start = time.perf_counter()
            self.train()
            order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            total, count = 0.0, 0
            for lo in range(0, len(order), batch_size):
                rows = order[lo:lo + batch_size]
                x, y = inputs[rows].to(device), targets[rows].to(device)
                hidden = self(x)[y != PAD]
                y = y[y != PAD]
                loss = self._loss(hidden, y, negatives, trained)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(y), count + len(y)
            valid = evaluate(self, split.valid, ks=(10,), max_len=self.max_len)["NDCG@10"]
            history.append({"epoch": epoch + 1, "loss": total / count, "valid_NDCG@10": valid,
                            "seconds": time.perf_counter() - start})
            if log:
                log(f"epoch {epoch + 1:3d}  loss {total / count:.4f}  valid NDCG@10 {valid:.4f}")
            if valid > best:
                best, best_state, stale = valid, copy.deepcopy(self.state_dict()), 0
            else:
                stale += 1
                if stale >= patience:
                    break
        self.load_state_dict(best_state)
        self.eval()
        return history

    def _windows(self, split: LeaveOneOut) -> tuple[torch.Tensor, torch.Tensor]:
        """Training windows: inputs and next-item targets ``[W, <= max_len]``, left-padded with 0."""
        return training_windows(split.train_sequences, self.max_len)

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor, negatives: int | None,
              trained: torch.Tensor) -> torch.Tensor:
        table = self.item_embedding.weight
        if negatives is None:   # the trained items of 1..n (column j is item j + 1)
            return F.cross_entropy((hidden @ table[1:].T).masked_fill(~trained[1:], -math.inf), targets - 1)
        pool = trained.nonzero().squeeze(1)
        sampled = pool[torch.randint(0, len(pool), (negatives,), device=hidden.device)]
        positive = (hidden * table[targets]).sum(-1, keepdim=True)
        negative = hidden @ table[sampled].T
        negative = negative.masked_fill(sampled[None, :] == targets[:, None], -math.inf)
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))
