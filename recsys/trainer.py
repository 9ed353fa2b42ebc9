"""Training of :class:`moa.recsys.recommender.TextSeqRecommender`: the fit loop and the per-batch loss.

* :func:`fit` (the recommender's ``fit``): next-item prediction at every position of each training window
  (:func:`moa.recsys.data.training_windows`), softmax over the batch's own items (in-batch negatives) plus
  ``negatives`` uniformly sampled items of the domain; validation NDCG@10 (the shared harness, full ranking)
  after each epoch keeps the best weights. When nothing in the item encoder trains, item vectors come from a
  cache (one encoder pass per catalogue).
* :func:`batch_loss` (the recommender's ``batch_loss``): the loss of one batch of windows, mixed domains; what
  :func:`fit` and the Lightning module of :mod:`moa.pipelines.recommendation` minimise per step.
* :func:`bucketed_batches`: random batches of windows of similar length; :func:`check_splits`,
  :func:`trainable_state` / :func:`load_trainable_state`: the bookkeeping around them.

The functions take the recommender as their first argument and only use its public surface (item encoder,
heads, item tables, user states); this module imports no model class.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import PAD, LeaveOneOut, training_windows
from .evaluate import evaluate

if TYPE_CHECKING:  # annotations only (the recommender imports this module)
    from .recommender import TextSeqRecommender


def fit(model: TextSeqRecommender, splits: LeaveOneOut | Mapping[str, LeaveOneOut], *, epochs: int = 20,
        train_encoder: bool = True, lr: float = 1e-3, encoder_lr: float | None = None, batch_size: int = 128,
        negatives: int = 256, weight_decay: float = 0.0, warmup: float = 0.0, patience: int = 5, seed: int = 0,
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
    splits = check_splits(model, splits)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    windows = {d: training_windows(s.train_sequences, model.config.max_len) for d, s in splits.items()}
    trained = {d: s.item_counts() > 0 for d, s in splits.items()}  # items of the training data (cold ones: not)
    for domain, known in trained.items():  # item IDs (ID + text fusion) are learnt for these only
        model.head(domain).mark_trained_items(known)
    if not any(len(w[0]) for w in windows.values()):
        raise ValueError("no training transitions: every training sequence has fewer than 2 items")
    encoder_params = model.item_encoder.trainable_parameters() if train_encoder else []
    if train_encoder and not encoder_params:
        raise ValueError("train_encoder=True, but the item encoder has no trainable parameters")
    groups = [{"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": encoder_lr or lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    rows = [(d, i) for d, (x, _) in windows.items() for i in range(len(x))]
    ramp = warmup * math.ceil(len(rows) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (ramp + 1)))
    start, stale = time.perf_counter(), 0

    def validate() -> float:
        return sum(evaluate(model, s.valid, ks=(10,), max_len=model.config.max_len)["NDCG@10"]
                   for s in splits.values()) / len(splits)

    initial = validate()  # epoch 0: the starting point (e.g. the cached-encoder model before its adapters train)
    best, best_state = (initial, trainable_state(model)) if keep_start else (-math.inf, None)
    history = [{"epoch": 0, "loss": math.nan, "valid_NDCG@10": initial, "seconds": time.perf_counter() - start}]
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        order = torch.randperm(len(rows), generator=generator).tolist()
        for chunk in (order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)):
            batch: dict[str, list[int]] = {}
            for j in chunk:
                batch.setdefault(rows[j][0], []).append(rows[j][1])
            loss, n = model.batch_loss(batch, windows, negatives, encoder_params, generator, trained)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if encoder_params:
                model.clear_cache()
            total, count = total + loss.item() * n, count + n
        valid = validate()
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "loss": total / max(count, 1), "valid_NDCG@10": valid, "seconds": seconds})
        if log:
            log(f"epoch {epoch:3d}  loss {total / max(count, 1):.4f}  valid NDCG@10 {valid:.4f}  {seconds:6.1f}s")
        if valid > best:
            best, best_state, stale = valid, trainable_state(model), 0
        else:
            stale += 1
        if stale >= patience or (max_seconds is not None and seconds >= max_seconds):
            break
    load_trainable_state(model, best_state)
    model.clear_cache()
    model.eval()
    best_epoch = max(history[0 if keep_start else 1:], key=lambda h: h["valid_NDCG@10"])["epoch"]
    return {"epochs": len(history) - 1, "best_epoch": best_epoch, "best_valid": best,
            "seconds": time.perf_counter() - start, "history": history}


def batch_loss(model: TextSeqRecommender, batch: dict[str, list[int]], windows, negatives: int | None,
               encoder_params, generator, trained: Mapping[str, Tensor] | None = None):
    """Mean softmax loss and the number of predictions, for the windows ``batch`` selects per domain (what
    :func:`fit` and the Lightning module minimise per step): over every item of the domain (``negatives=None``)
    or over the in-batch items and ``negatives`` sampled ones. ``trained[domain]`` (bool ``[n_items + 1]``) limits
    the candidates to the items of the training data: items held out (cold start) are not in the catalogue yet."""
    device = model.item_encoder.device
    plan = []
    for domain, idx in batch.items():
        x, y = windows[domain][0][idx], windows[domain][1][idx]
        width = int((x != PAD).sum(1).max())  # drop the columns that are padding in every window
        x, y = x[:, -width:].to(device), y[:, -width:].to(device)
        n_items = model.item_encoder.n_items(domain)
        if negatives is None:  # full softmax over the catalogue
            candidates = torch.arange(1, n_items + 1, device=device)
        else:
            drawn = torch.randint(1, n_items + 1, (min(negatives, n_items),), generator=generator).to(device)
            candidates = torch.unique(torch.cat([x.reshape(-1), y.reshape(-1), drawn]))
            candidates = candidates[candidates != PAD]
        if trained is not None and domain in trained:
            candidates = candidates[trained[domain].to(device)[candidates]]
        lookup = torch.zeros(n_items + 1, dtype=torch.long, device=device)
        lookup[candidates] = torch.arange(len(candidates), device=device)
        plan.append((domain, x, y, candidates, lookup))
    if encoder_params:
        reps = model.item_encoder.encode_many([(d, c, model.expert_of(d)) for d, _, _, c, _ in plan])
    else:
        reps = [model.item_table(d)[c] for d, _, _, c, _ in plan]
    losses, count = [], 0
    for (domain, x, y, candidates, lookup), rep in zip(plan, reps):
        vectors = model.head(domain).item_vectors(rep, candidates)
        states = model.user_states(domain, x, vectors, lookup)
        target = y != PAD
        logits = states[target] @ vectors.T
        losses.append(F.cross_entropy(logits, lookup[y[target]], reduction="sum"))
        count += int(target.sum())
    return torch.stack(losses).sum() / max(count, 1), count


def check_splits(model: TextSeqRecommender, splits: LeaveOneOut | Mapping[str, LeaveOneOut]) -> dict[str, LeaveOneOut]:
    """``{domain name: split}`` from one split (of a one-domain model) or a mapping; sizes checked."""
    if isinstance(splits, LeaveOneOut):
        name = splits.domain if splits.domain in model.domains else model.domain_name(None)
        splits = {name: splits}
    out = {}
    for domain, split in splits.items():
        domain = model.domain_name(domain)
        if split.n_items != model.item_encoder.n_items(domain):
            raise ValueError(f"domain {domain!r}: the split has {split.n_items} items, the catalogue "
                             f"{model.item_encoder.n_items(domain)}")
        out[domain] = split
    return out


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the parameters that train (the best epoch's weights are kept this way)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor] | None) -> None:
    """Copy a :func:`trainable_state` back into ``model`` (nothing for None)."""
    if state is None:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
