"""Transformer building blocks shared by the sequential user encoders (SASRec and the text recommender's).

* :class:`TransformerBlock`: a pre-LayerNorm self-attention + feed-forward block taking a boolean mask.
* :func:`look_back_mask`: the causal (look-back) attention mask of a left-padded history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def look_back_mask(real: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, L, L]`` for histories whose real-item mask is ``real`` ``[B, L]``.

    Position t attends to the real items at positions <= t; a padding position attends only to itself (its output
    is meaningless and never used, but no row of the softmax is empty).
    """
    length = real.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=real.device)
    causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
    return (causal & (real[:, None, :] | eye))[:, None]


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: masked multi-head self-attention and a GELU feed-forward (dropout on the
    attention probabilities and on both residual branches, as RecBole; ``ff_dropout`` also inside the feed-forward).
    ``allowed`` is the boolean attention mask. Shared by SASRec and the text recommender's user encoder."""

    def __init__(self, hidden: int, heads: int, inner: int, dropout: float, ff_dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Dropout(ff_dropout), nn.Linear(inner, hidden))
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                              dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(b, length, d)))
        return x + self.dropout(self.ff(self.norm2(x)))
