"""Exact cheap training of adapters on the top layers of a causal LM: cache the frozen bottom, train the top.

When only decoder layers ``start..L-1`` carry adapters, the hidden state entering layer ``start`` does not depend on
them. :func:`frozen_states` runs layers ``0..start-1`` once per row (the forward stops at layer ``start``) and keeps
that state; :func:`truncated` makes the same decoder model run only layers ``start..`` so the cached states go in as
``inputs_embeds`` (right padding, position ids from 0, the attention mask: what the full model computes for the
real tokens). :func:`target_scores` takes logits only at the positions that predict a target token (the hidden
states there, then the LM head), so neither the prompt's logits nor the frozen layers cost anything in training.

Teacher-forced exact match (:func:`target_scores`' ``exact``): greedy generation returns target + eos iff the argmax
at every target position (and at the eos position) is that token, because each greedy step sees the same prefix
as the teacher-forced position does as long as every earlier step was right (tests/test_bench_routers_real_llm.py
checks it against ``generate``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack inside a causal LM, a MoA model or a PEFT model (the module with ``layers`` and
    ``embed_tokens``: Llama's ``LlamaModel``)."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "embed_tokens"):
            return module
    raise TypeError(f"{type(model).__name__} has no decoder stack with .layers and .embed_tokens")


class _Reached(Exception):
    """Raised by the hook on layer ``start``: the rest of the forward is not needed."""


def pad_right(seqs: Sequence[Tensor | Sequence[int]], value: float | int) -> Tensor:
    """Rows of different lengths as one right-padded tensor ``[B, T, ...]``."""
    seqs = [torch.as_tensor(s) for s in seqs]
    return nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


@torch.no_grad()
def frozen_states(model: nn.Module, rows: Sequence[Sequence[int]], start: int, batch_size: int = 16) -> list[Tensor]:
    """Per row of token ids: the hidden state entering decoder layer ``start`` ``[len, hidden]`` (float32 as the
    model computes it). Rows run in length order, right-padded, so little padding is computed."""
    stack, captured = decoder(model), {}

    def stop(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Reached

    handle = stack.layers[start].register_forward_pre_hook(stop, with_kwargs=True)
    out: list[Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    try:
        for at in range(0, len(order), batch_size):
            chunk = order[at:at + batch_size]
            ids = pad_right([list(rows[i]) for i in chunk], 0)
            mask = pad_right([[1] * len(rows[i]) for i in chunk], 0)
            try:
                stack(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Reached:
                pass
            for j, i in enumerate(chunk):
                out[i] = captured["h"][j, :len(rows[i])].clone()
    finally:
        handle.remove()
    return out  # type: ignore[return-value]


@contextlib.contextmanager
def truncated(model: nn.Module, start: int) -> Iterator[None]:
    """Inside the block the decoder runs only its layers ``start..`` (the same modules, adapters included)."""
    stack = decoder(model)
    full = stack.layers
    stack.layers = nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        stack.layers = full


def cached_batch(states: Sequence[Tensor], labels: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """A truncated-model batch: ``inputs_embeds`` (cached states, right-padded), ``attention_mask``,
    ``position_ids`` (0.. per row) and ``labels`` (-100 on the prompt and the padding)."""
    lengths = [len(s) for s in states]
    mask = pad_right([[1] * n for n in lengths], 0)
    return {"inputs_embeds": pad_right(list(states), 0.0), "attention_mask": mask,
            "position_ids": torch.arange(mask.shape[1]).expand_as(mask),
            "labels": pad_right([list(y) for y in labels], -100)}


def target_scores(model: nn.Module, batch: dict[str, Tensor], **context) -> dict[str, Tensor]:
    """Loss and teacher-forced hits at the target positions only.

    ``batch``: ``labels`` and ``attention_mask`` plus ``input_ids`` (full model) or ``inputs_embeds`` and
    ``position_ids`` (inside :func:`truncated`); ``context``: routing keywords (``task_ids``). Returns per row
    ``loss_sum`` and ``tokens`` (the summed cross-entropy of its target tokens and their number) and ``exact``
    (every target token is the argmax), and ``logits`` ``[n target tokens, vocab]`` in row order.
    """
    labels = batch["labels"]
    next_labels = labels[:, 1:]
    rows, cols = (next_labels != -100).nonzero(as_tuple=True)  # position col predicts the label at col + 1
    captured = {}
    handle = decoder(model).register_forward_hook(lambda m, a, out: captured.__setitem__("h", out.last_hidden_state))
    try:
        inputs = {k: batch[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids") if k in batch}
        model(**inputs, **context, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    logits = model.get_output_embeddings()(captured["h"][rows, cols]).float()
    targets = next_labels[rows, cols]
    losses = F.cross_entropy(logits, targets, reduction="none")
    size = labels.shape[0]
    wrong = torch.zeros(size).index_add_(0, rows, (logits.argmax(-1) != targets).float().detach())
    tokens = torch.zeros(size).index_add_(0, rows, torch.ones_like(losses))
    return {"loss_sum": torch.zeros(size, dtype=losses.dtype).index_add(0, rows, losses), "tokens": tokens,
            "exact": (wrong == 0) & (tokens > 0), "logits": logits}
