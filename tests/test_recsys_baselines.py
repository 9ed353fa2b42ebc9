"""Baselines: popularity and SASRec on generated atomic-file fixtures, in the shared evaluation harness."""

import pytest
import torch

from moa.recsys.baselines import Popularity, SASRec
from moa.recsys.data import load_atomic
from moa.recsys.evaluate import evaluate, trainable_parameters


def write_cycle_dataset(root, n_items=20, n_users=60, length=12, seed=0):
    """RecBole atomic files where every user walks the item cycle 1 -> 2 -> ... -> n -> 1 from a random start;
    items 1-3 also appear as extra 'popular' interactions that break no sequence (they come first in time)."""
    g = torch.Generator().manual_seed(seed)
    d = root / "cycle"
    d.mkdir()
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        start = int(torch.randint(0, n_items, (1,), generator=g))
        for t in range(length):
            lines.append(f"u{u}\t{(start + t) % n_items + 1}\t{1000 + t}")
    (d / "cycle.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\ttitle:token_seq\tgenre:token"]
    items += [f"{i}\tItem number {i}\t{'even' if i % 2 == 0 else 'odd'}" for i in range(1, n_items + 1)]
    (d / "cycle.item").write_text("\n".join(items) + "\n")
    return load_atomic(d)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    return write_cycle_dataset(tmp_path_factory.mktemp("recsys"))


def test_popularity_scores_training_counts(cycle):
    split = cycle.leave_one_out()
    pop = Popularity().fit(split)
    scores = pop.score(torch.zeros(3, 4, dtype=torch.long))
    assert scores.shape == (3, cycle.n_items + 1)
    assert torch.equal(scores[0], split.item_counts().float()) and scores[0, 0] == 0
    result = evaluate(pop, split.test, ks=(1, 20))
    assert result["HR@20"] == 1.0   # every remaining item fits in the top 20 of a 20-item catalogue
    counts = split.item_counts()
    for history, target, rank in zip(split.test.histories, split.test.targets, result.ranks):
        unseen = torch.ones(cycle.n_items + 1, dtype=torch.bool)
        unseen[history] = False
        unseen[0], unseen[target] = False, True
        assert rank == int((counts[unseen] >= counts[target]).sum())   # rank by hand: unseen items counted as often
    with pytest.raises(RuntimeError, match="before fit"):
        Popularity().score(torch.zeros(1, 1, dtype=torch.long))


def tiny_sasrec(n_items, seed=0, **kw):
    torch.manual_seed(seed)
    return SASRec(n_items, hidden=32, n_layers=1, n_heads=2, inner=64, dropout=0.1, max_len=10, **kw)


def test_sasrec_is_causal_and_left_padding_invariant():
    model = tiny_sasrec(20).eval()
    x = torch.tensor([[3, 4, 5, 6, 7]])
    h = model(x)
    changed = model(torch.tensor([[3, 4, 5, 6, 19]]))
    assert torch.allclose(h[:, :4], changed[:, :4], atol=1e-6)        # the future does not leak backwards
    assert not torch.allclose(h[:, 4], changed[:, 4])
    padded = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7]])
    assert torch.allclose(model.score(x), model.score(padded), atol=1e-5)
    long = torch.arange(1, 16)[None]                                  # longer than max_len: last 10 items used
    assert torch.allclose(model.score(long), model.score(long[:, -10:]), atol=1e-5)
    assert model.score(x)[0, 0] == float("-inf")
    with pytest.raises(ValueError, match=r"0\.\.20"):
        model(torch.tensor([[21]]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(torch.tensor([1, 2]))


@pytest.mark.parametrize("negatives", [None, 8])
def test_sasrec_learns_the_sequential_pattern_and_beats_popularity(cycle, negatives):
    split = cycle.leave_one_out()
    model = tiny_sasrec(split.n_items)
    history = model.fit(split, epochs=60, lr=1e-2, batch_size=32, negatives=negatives, patience=60)
    best = max(h["valid_NDCG@10"] for h in history)
    assert evaluate(model, split.valid, ks=(10,))["NDCG@10"] == pytest.approx(best)   # best weights restored
    assert history[-1]["loss"] < history[0]["loss"]
    sas = evaluate(model, split.test, ks=(1, 10))
    pop = evaluate(Popularity().fit(split), split.test, ks=(1, 10))
    assert sas["HR@1"] > 0.9 and sas["HR@1"] > pop["HR@1"] + 0.5
    assert not model.training and trainable_parameters(model) > 0


def test_sasrec_early_stopping_and_checks(cycle):
    split = cycle.leave_one_out()
    model = tiny_sasrec(split.n_items)
    history = model.fit(split, epochs=50, lr=0.0, patience=2)          # lr 0: never improves after epoch 1
    assert len(history) == 3
    with pytest.raises(ValueError, match="model has 5 items, split has 20"):
        tiny_sasrec(5).fit(split, epochs=1)
    small = split.with_train_fraction(0.25, seed=0)
    assert len(tiny_sasrec(20)._windows(small)[0]) == len(small.train_sequences)   # one window per short sequence


@pytest.mark.parametrize("negatives", [None, 8])
def test_sasrec_never_trains_on_items_held_out_for_cold_start(cycle, negatives):
    split = cycle.leave_one_out().with_cold_items(0.2, seed=0)
    model = tiny_sasrec(split.n_items)
    before = model.item_embedding.weight.detach().clone()
    model.fit(split, epochs=3, lr=1e-2, batch_size=32, negatives=negatives, patience=3)
    cold = list(split.cold_items)
    warm = [i for i in range(1, split.n_items + 1) if i not in cold]
    # a held-out item is neither a target nor a negative: its embedding stays where a new item's would start
    assert torch.equal(model.item_embedding.weight[cold], before[cold])
    assert not torch.equal(model.item_embedding.weight[warm], before[warm])
