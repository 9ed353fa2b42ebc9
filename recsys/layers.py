"""The sequence encoder shared by the sequential recommenders (SASRec and the text recommender's user encoder).

* :class:`SequenceEncoder`: item vectors of a left-padded history -> causal states (positions from the right,
  input LayerNorm and dropout, pre-LayerNorm blocks, output LayerNorm).
* :class:`TransformerBlock`: a pre-LayerNorm self-attention + feed-forward block taking a boolean mask.
* :func:`look_back_mask`: the causal (look-back) attention mask of a left-padded history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moa.experts.errors import UserError


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


class SequenceEncoder(nn.Module):
    """Causal transformer over the item vectors of left-padded histories (SASRec's architecture).

    Positions are absolute from the right (the most recent item always sits at ``max_len - 1``); position t
    attends to the real items at positions <= t. Linear and embedding weights start at N(0, 0.02), biases at 0
    (RecBole's SASRec); subclasses add how items become vectors.
    """

    def __init__(self, hidden: int = 64, n_layers: int = 2, heads: int = 2, inner: int = 256, dropout: float = 0.2,
                 max_len: int = 50):
        super().__init__()
        if hidden % heads:
            raise UserError(f"hidden ({hidden}) must be divisible by the number of heads ({heads})")
        self.max_len = max_len
        self.position = nn.Embedding(max_len, hidden)
        self.input_norm, self.input_dropout = nn.LayerNorm(hidden), nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, heads, inner, dropout) for _ in range(n_layers))
        self.output_norm = nn.LayerNorm(hidden)
        self.apply(init_weights)

    def encode(self, vectors: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """States ``[B, L, hidden]`` for item vectors ``[B, L, hidden]`` and the real-item mask ``[B, L]``."""
        length = vectors.shape[1]
        if length > self.max_len:
            raise UserError(f"histories longer than max_len={self.max_len}; keep the most recent items")
        positions = torch.arange(self.max_len - length, self.max_len, device=vectors.device)
        x = self.input_dropout(self.input_norm(vectors + self.position(positions)))
        allowed = look_back_mask(real)
        for block in self.blocks:
            x = block(x, allowed)
        return self.output_norm(x)


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) for linear and embedding weights, zero biases and padding rows (RecBole's SASRec init)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
