"""Training of the sequential recommenders: one loop, and the text recommender's step.

* :func:`train`: the one next-item training loop (windows, random batches, AdamW with warmup, validation NDCG@10
  after each epoch, the best weights kept, early stopping), used by SASRec (:mod:`moa.recsys.baselines`) and the
  text recommender.
* :func:`fit` (the text recommender's ``fit``): its optimiser groups (user encoders, item-encoder adapters) and
  step on :func:`train`. When nothing in the item encoder trains, item vectors come from a cache (one encoder pass
  per catalogue).
* :func:`batch_loss` (the text recommender's ``batch_loss``): the loss of one batch of windows, mixed domains; what
  :func:`fit` and the Lightning module of :mod:`moa.pipelines.kinds.recommender.module` minimise per step.
* :func:`check_splits`, :func:`trainable_state` / :func:`load_trainable_state`: the bookkeeping around them.

The functions only use the models' public surface; this module imports no model class.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import PAD, LeaveOneOut, training_windows
from .layers import linear_cross_entropy
from .evaluate import evaluate
from moa.experts.errors import UserError

if TYPE_CHECKING:  # annotations only (the recommender imports this module)
    from .recommender import TextSeqRecommender


def train(model: nn.Module, splits: Mapping[str | None, LeaveOneOut], groups: list[dict], step_loss: Callable,
          *, max_len: int, epochs: int, batch_size: int, weight_decay: float = 0.0, warmup: float = 0.0,
          patience: int = 5, seed: int = 0, keep_start: bool = True, max_seconds: float | None = None,
          after_step: Callable[[], None] | None = None, log: Callable[[str], None] | None = None,
          progress: bool = False, by_length: bool = False) -> dict[str, Any]:
    """The one next-item training loop (SASRec and the text recommender).

    Every epoch cuts each training sequence, from its end, into windows of ``max_len + 1`` items
    (:func:`moa.recsys.data.training_windows`; input = all but the last, target at every position = the next
    item) and visits them in random batches of ``batch_size`` (domains mixed). One step is
    ``step_loss(batch {domain: window rows}, windows, generator, trained {domain: bool [n_items + 1]})`` ->
    ``(mean loss, predictions)``, minimised by AdamW over ``groups`` whose learning rates ramp up linearly over the
    first ``warmup`` epochs; ``trained`` marks the items of the training data (held-out cold-start items are not
    candidates). Before training (when ``keep_start``) and after each epoch, validation NDCG@10 (the harness, full
    ranking, seen items masked; averaged over domains) selects the best weights; ``patience`` epochs without
    improvement stop training, as does ``max_seconds``. ``by_length`` batches windows of similar length (each run of
    :data:`LENGTH_POOL` shuffled batches' windows is sorted by length, cut into batches, and all batches are visited
    in random order): far less padding to encode at a long ``max_len`` (ML-1M, 200: 43% of the positions).
    ``progress`` shows a bar over the epochs (loss, validation NDCG@10 and the best so far); ``log`` receives a line
    per epoch. Returns ``{"epochs", "best_epoch", "best_valid", "seconds", "history"}`` (``history[0]`` is the
    start).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    windows = {d: training_windows(s.train_sequences, max_len) for d, s in splits.items()}
    if not any(len(w[0]) for w in windows.values()):
        raise UserError("no training transitions: every training sequence has fewer than 2 items")
    trained = {d: s.trained_items for d, s in splits.items()}
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    rows = [(d, i) for d, (x, _) in windows.items() for i in range(len(x))]
    lengths = torch.cat([(x != PAD).sum(1) for x, _ in windows.values()])
    ramp = warmup * math.ceil(len(rows) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (ramp + 1)))
    start, stale = time.perf_counter(), 0

    def validate() -> float:
        return sum(evaluate(model, s.valid, ks=(10,), max_len=max_len)["NDCG@10"] for s in splits.values()) / len(splits)

    initial = validate() if keep_start else math.nan  # epoch 0: the starting point (e.g. a trained user encoder)
    best, best_state = (initial, trainable_state(model)) if keep_start else (-math.inf, None)
    history = [{"epoch": 0, "loss": math.nan, "valid_NDCG@10": initial, "seconds": time.perf_counter() - start}]
    bar = tqdm(total=epochs, unit="epoch", desc=f"fit {type(model).__name__}", disable=not progress, leave=False)
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for picked in batch_order(lengths, batch_size, generator, by_length):
            batch: dict[str | None, list[int]] = {}
            for j in picked.tolist():
                batch.setdefault(rows[j][0], []).append(rows[j][1])
            loss, n = step_loss(batch, windows, generator, trained)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if after_step:
                after_step()
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
        bar.update()
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}", valid=f"{valid:.4f}", best=f"{best:.4f}")
        if stale >= patience or (max_seconds is not None and seconds >= max_seconds):
            break
    bar.close()
    load_trainable_state(model, best_state)
    model.eval()
    best_epoch = max(history[0 if keep_start else 1:], key=lambda h: h["valid_NDCG@10"])["epoch"]
    return {"epochs": len(history) - 1, "best_epoch": best_epoch, "best_valid": best,
            "seconds": time.perf_counter() - start, "history": history}


LENGTH_POOL = 16
"""With ``by_length``, windows are sorted by length within runs of this many shuffled batches."""


def batch_order(lengths: Tensor, batch_size: int, generator: torch.Generator, by_length: bool = False) -> list[Tensor]:
    """One epoch's batches of window rows: consecutive slices of a random permutation, or with ``by_length`` the
    rows of each run of :data:`LENGTH_POOL` batches sorted by window length, sliced, and the batches shuffled."""
    order = torch.randperm(len(lengths), generator=generator)
    if not by_length:
        return list(order.split(batch_size))
    runs = [run[lengths[run].argsort(stable=True)] for run in order.split(LENGTH_POOL * batch_size)]
    batches = [b for run in runs for b in run.split(batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def fit(model: TextSeqRecommender, splits: LeaveOneOut | Mapping[str, LeaveOneOut], *, epochs: int = 20,
        train_encoder: bool = True, lr: float = 1e-3, encoder_lr: float | None = None, batch_size: int = 128,
        negatives: int | None = 256, weight_decay: float = 0.0, warmup: float = 0.0, patience: int = 5,
        seed: int = 0, keep_start: bool = True, max_seconds: float | None = None,
        log: Callable[[str], None] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the text recommender on the splits' training sequences (one split per domain, or one split of a
    one-domain model) with the shared loop :func:`train`.

    The loss at each position is a softmax over every item of the domain (``negatives=None``) or over the batch's
    own items plus ``negatives`` items drawn uniformly from the domain. With ``train_encoder`` the item-encoder
    parameters that require grad (LoRA experts, an X-Cross integrator) train with ``encoder_lr`` (default ``lr``)
    and the items are re-encoded through the top layers at every step; otherwise item vectors come from the
    cache. ``warmup`` epochs of learning-rate ramp help when fine-tuning a trained model (a fresh Adam's first steps
    are as large as later ones). Epoch 0, the starting point, may be the best unless ``keep_start=False``, which
    makes sure trained adapters are kept. Item IDs (``config.item_ids``) are learnt for the items of the training
    data only. ``progress`` shows a bar over the epochs. Returns what :func:`train` returns.
    """
    splits = check_splits(model, splits)
    encoder_params = model.item_encoder.trainable_parameters() if train_encoder else []
    if train_encoder and not encoder_params:
        raise UserError("train_encoder=True, but the item encoder has no trainable parameters")
    for domain, split in splits.items():
        model.head(domain).mark_trained_items(split.trained_items)
    groups = [{"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": encoder_lr or lr})

    def step_loss(batch, windows, generator, trained):
        return model.batch_loss(batch, windows, negatives, encoder_params, generator, trained)

    try:
        return train(model, splits, groups, step_loss, max_len=model.config.max_len, epochs=epochs,
                     batch_size=batch_size, weight_decay=weight_decay, warmup=warmup, patience=patience, seed=seed,
                     keep_start=keep_start, max_seconds=max_seconds, log=log, progress=progress,
                     after_step=model.clear_cache if encoder_params else None)
    finally:
        model.clear_cache()


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
        n = int(target.sum())
        # the full [positions, items] logits never exist whole (chunked, fused with the gradient)
        losses.append(linear_cross_entropy(states[target], vectors, lookup[y[target]]) * n if n else states.sum() * 0)
        count += n
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
            raise UserError(f"domain {domain!r}: the split has {split.n_items} items, the catalogue "
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
