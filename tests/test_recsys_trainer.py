"""The shared recommender training loop (moa.recsys.trainer.train) keeps its best epoch's weights.

A run whose later epochs validate worse than an earlier one is forced with a hook: after each epoch's (single)
optimiser step, ``after_step`` sets the weights to the next state of a script. The test records, through the loop's
``log`` callback, a copy of the weights at the end of every epoch, evaluates each copy itself, and checks that the
returned model holds the best copy and scores its NDCG@10.
"""

import pytest
import torch
from torch import nn

from moa.recsys.data import LeaveOneOut
from moa.recsys.evaluate import evaluate
from moa.recsys.trainer import train

N_ITEMS, MAX_LEN = 30, 8


class ItemScores(nn.Module):
    """One learnt score per item, the same for every history (a popularity-like scorer)."""

    def __init__(self, n_items: int):
        super().__init__()
        self.scores = nn.Parameter(torch.zeros(n_items + 1))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)  # not trainable: never saved or restored

    def score(self, histories: torch.Tensor, domain: str | None = None) -> torch.Tensor:
        return self.scores.expand(len(histories), -1)


def cyclic_split(users: int = 40, length: int = 9, seed: int = 0) -> LeaveOneOut:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, N_ITEMS, (users,), generator=g)
    seqs = tuple((s + torch.arange(length)) % N_ITEMS + 1 for s in starts)
    return LeaveOneOut(tuple(f"u{i}" for i in range(users)), seqs, N_ITEMS, "a")


def ndcg(model: ItemScores, split: LeaveOneOut) -> float:
    return evaluate(model, split.valid, ks=(10,), max_len=MAX_LEN)["NDCG@10"]


# the state at the start and after each of 4 epochs, as ranks of validation quality (0 = worst, 4 = best)
SCRIPTS = {
    "best_in_the_middle": ([0, 2, 4, 3, 1], True),
    "start_is_best": ([4, 1, 3, 2, 0], True),
    "start_ignored_without_keep_start": ([4, 0, 3, 1, 2], False),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_train_returns_the_best_epochs_weights_not_the_last(script):
    order, keep_start = SCRIPTS[script]
    split = cyclic_split()
    model = ItemScores(N_ITEMS)
    # five score vectors of distinct validation NDCG@10, sorted from worst to best
    g = torch.Generator().manual_seed(1)
    candidates = [torch.randn(N_ITEMS + 1, generator=g) for _ in range(5)]
    quality = []
    for vector in candidates:
        with torch.no_grad():
            model.scores.copy_(vector)
        quality.append(ndcg(model, split))
    assert len(set(quality)) == len(quality)
    ranked = [candidates[i] for i in sorted(range(5), key=quality.__getitem__)]
    states = [ranked[rank] for rank in order]

    with torch.no_grad():
        model.scores.copy_(states[0])
    steps = []

    def scripted_step():  # one step per epoch (one batch): the epoch ends on the script's next state
        steps.append(1)
        with torch.no_grad():
            model.scores.copy_(states[len(steps)])

    seen = {0: model.scores.detach().clone()}  # the weights validated at the start and after each epoch

    def record(line):
        seen[len(seen)] = model.scores.detach().clone()

    def step_loss(batch, windows, generator, trained):
        return (model.scores * 0).sum(), 1

    epochs = len(states) - 1
    result = train(model, {"a": split}, [{"params": [model.scores], "lr": 0.0}], step_loss, max_len=MAX_LEN,
                   epochs=epochs, batch_size=10_000, patience=10, keep_start=keep_start, after_step=scripted_step,
                   log=record)
    assert len(steps) == epochs and result["epochs"] == epochs and len(seen) == epochs + 1

    trained_weights = model.scores.detach().clone()
    values = {}
    for epoch, weights in seen.items():  # each recorded state evaluated by the test itself
        with torch.no_grad():
            model.scores.copy_(weights)
        values[epoch] = ndcg(model, split)
    eligible = [e for e in values if keep_start or e > 0]
    best = max(eligible, key=values.__getitem__)
    assert values[epochs] < values[best]  # the last epoch is worse: the run must go back
    assert torch.equal(trained_weights, seen[best]), f"not the weights of the best epoch {best} (of {epochs})"
    assert result["best_epoch"] == best and result["best_valid"] == values[best]
    with torch.no_grad():
        model.scores.copy_(trained_weights)
    assert ndcg(model, split) == values[best]
    assert torch.equal(model.frozen, torch.ones(3)) and not model.training
