"""Ranking metrics and the evaluation harness, against hand-computed values and RecBole's top-K definitions."""

import math

import numpy as np
import pytest
import torch

from moa.recsys.data import LeaveOneOut, Stage
from moa.recsys.evaluate import EvalResult, RecModel, candidate_mask, evaluate, trainable_parameters
from moa.recsys.metrics import hit_at_k, mrr_at_k, ndcg_at_k, ranking_metrics, target_ranks


def test_metrics_from_ranks_by_hand():
    ranks = torch.tensor([1, 3, 12, 25])
    m = ranking_metrics(ranks, ks=(10, 20))
    assert m["HR@10"] == pytest.approx(2 / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / 2) / 4)                         # 1/log2(2), 1/log2(4)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["HR@20"] == pytest.approx(3 / 4)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(13)) / 4)
    assert m["MRR@20"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 4)
    assert list(m) == ["HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "MRR@20"]
    assert hit_at_k(torch.tensor([10, 11]), 10).tolist() == [1.0, 0.0]
    assert ndcg_at_k(torch.tensor([7]), 10).item() == pytest.approx(1 / 3)
    assert mrr_at_k(torch.tensor([4, 11]), 10).tolist() == [0.25, 0.0]
    with pytest.raises(ValueError, match="no ranks"):
        ranking_metrics(torch.tensor([], dtype=torch.long))


def test_target_ranks_ties_count_against_the_target_and_candidates_exclude():
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.5, 0.1],
                           [0.0, 0.2, 0.2, 0.2, 0.2]])
    assert target_ranks(scores, torch.tensor([2, 1])).tolist() == [3, 4]   # tie with item 3; 4 tied
    allowed = torch.tensor([[False, False, True, True, True], [False, True, False, True, True]])
    assert target_ranks(scores, torch.tensor([2, 1]), allowed).tolist() == [2, 3]
    with pytest.raises(ValueError, match="not among its row's candidates"):
        target_ranks(scores, torch.tensor([1, 1]), allowed)
    with pytest.raises(ValueError, match=r"targets must be \[B=2\]"):
        target_ranks(scores, torch.tensor([1]))
    with pytest.raises(ValueError, match="index the 5 score columns"):
        target_ranks(scores, torch.tensor([1, 5]))


def recbole_topk_metrics(scores: torch.Tensor, targets: torch.Tensor, k: int) -> dict:
    """RecBole's computation (evaluator/metrics.py): top-k list -> pos_index -> cumulative Hit / MRR / NDCG."""
    topk = torch.topk(scores, k, dim=1).indices.numpy()
    pos_index = topk == targets.numpy()[:, None]                      # [B, k] bool; one positive per user
    hit = (np.cumsum(pos_index, axis=1) > 0).astype(float)[:, -1]
    mrr = np.zeros(len(pos_index))
    for row, idx in enumerate(pos_index.argmax(axis=1)):
        mrr[row] = 1 / (idx + 1) if pos_index[row, idx] else 0.0
    dcg = np.cumsum(np.where(pos_index, 1.0 / np.log2(np.arange(1, k + 1) + 1), 0.0), axis=1)[:, -1]
    idcg = 1.0                                                         # min(|R(u)|, k) = 1 relevant item
    return {f"HR@{k}": hit.mean(), f"MRR@{k}": mrr.mean(), f"NDCG@{k}": (dcg / idcg).mean()}


def test_metrics_match_recbole_definitions_on_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 60, generator=g)                         # continuous: no ties
    targets = torch.randint(0, 60, (300,), generator=g)
    ours = ranking_metrics(target_ranks(scores, targets), ks=(5, 10, 20))
    for k in (5, 10, 20):
        for name, value in recbole_topk_metrics(scores, targets, k).items():
            assert ours[name] == pytest.approx(value, abs=1e-6), name


def tiny_stage():
    """Two users over items 1..5. Scores below rank items 5 > 4 > 3 > 2 > 1 for everyone."""
    return Stage("test", ("a", "b"), (torch.tensor([5, 2]), torch.tensor([1, 4])), torch.tensor([3, 4]),
                 n_items=5, domain="toys")


def fixed_scorer(calls):
    def score(histories, domain):
        calls.append((histories.clone(), domain))
        return torch.tensor([100.0, 1.0, 2.0, 3.0, 4.0, 5.0]).expand(len(histories), -1)   # padding scores highest
    return score


def test_evaluate_full_ranking_masks_seen_items_and_padding_by_hand():
    calls = []
    result = evaluate(fixed_scorer(calls), tiny_stage(), ks=(1, 2))
    # user a: seen {5, 2} masked, target 3 ranks behind 4 only -> 2.  user b: target 4 is also in the history
    # (a repeat): it stays a candidate, 5 ranks above it -> 2.  Padding (score 100) never counts.
    assert result.ranks.tolist() == [2, 2]
    assert result["HR@1"] == 0.0 and result["HR@2"] == 1.0 and result["MRR@2"] == 0.5
    assert result["NDCG@2"] == pytest.approx(1 / math.log2(3))
    assert result.protocol == "full ranking over 5 items, seen masked" and result.domain == "toys"
    histories, domain = calls[0]
    assert histories.tolist() == [[5, 2], [1, 4]] and domain == "toys"
    unmasked = evaluate(fixed_scorer([]), tiny_stage(), ks=(1,), mask_seen=False)
    assert unmasked.ranks.tolist() == [3, 2] and "seen" not in unmasked.protocol   # RecBole sequential: only pad
    assert "HR@1" in str(result) and "toys" in str(result)


def test_evaluate_truncates_model_input_but_masks_the_whole_history():
    stage = Stage("valid", ("a",), (torch.tensor([5, 4, 1]),), torch.tensor([2]), n_items=5)
    calls = []
    result = evaluate(fixed_scorer(calls), stage, ks=(1,), max_len=1)
    assert calls[0][0].tolist() == [[1]] and calls[0][1] is None
    assert result.ranks.tolist() == [2]            # 5 and 4 masked even though the model only saw item 1


def test_candidate_mask():
    mask = candidate_mask([torch.tensor([2, 3]), torch.tensor([1])], torch.tensor([1, 1]), n_items=3)
    assert mask.tolist() == [[False, True, False, False], [False, True, True, True]]


def test_sampled_protocol_is_labelled_seeded_and_bounded():
    g = torch.Generator().manual_seed(1)
    n_items, users = 300, 64
    seqs = tuple(torch.randperm(n_items, generator=g)[:6] + 1 for _ in range(users))
    split = LeaveOneOut(tuple(map(str, range(users))), seqs, n_items)
    table = torch.randn(n_items + 1, generator=g)
    scorer = lambda h, d: table.expand(len(h), -1)   # noqa: E731
    sampled = evaluate(scorer, split.test, negatives=99, seed=5)
    assert sampled.protocol.startswith("SAMPLED 1+99")
    assert int(sampled.ranks.max()) <= 100 and int(sampled.ranks.min()) >= 1
    assert torch.equal(sampled.ranks, evaluate(scorer, split.test, negatives=99, seed=5).ranks)
    full = evaluate(scorer, split.test)
    assert bool((sampled.ranks <= full.ranks).all())   # a subset of the candidates can only rank the target higher
    # with more negatives than candidates, every candidate is drawn: the sampled ranks are the full ranks
    assert torch.equal(evaluate(scorer, split.test, negatives=1000).ranks, full.ranks)
    with pytest.raises(ValueError, match="negatives"):
        evaluate(scorer, split.test, negatives=0)


class ConstantModel(torch.nn.Module):
    def __init__(self, n_items):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(n_items + 1))
        self.seen_training = []

    def score(self, histories, domain=None):
        self.seen_training.append(self.training)
        return self.bias.expand(len(histories), -1)


def test_evaluate_accepts_recmodels_sets_eval_mode_and_checks_shapes():
    model = ConstantModel(5)
    assert isinstance(model, RecModel) and trainable_parameters(model) == 6 and trainable_parameters(print) == 0
    result = evaluate(model, tiny_stage())
    assert isinstance(result, EvalResult) and model.seen_training == [False] and model.training
    # all scores tied: ties count against the target, so a constant model ranks last among the candidates
    assert result.ranks.tolist() == [3, 4] and result["HR@10"] == 1.0 and result["MRR@10"] == pytest.approx(7 / 24)
    with pytest.raises(ValueError, match=r"expected \[B, n_items \+ 1\] = \(2, 6\)"):
        evaluate(lambda h, d: torch.zeros(len(h), 5), tiny_stage())
    with pytest.raises(TypeError, match="RecModel"):
        evaluate(42, tiny_stage())


def test_a_nan_candidate_ranks_above_the_target():
    """Row 0: target 0.5 with one NaN and one higher candidate -> rank 3 (NaN counts against it); row 1: a NaN that
    is not a candidate does not count -> rank 1."""
    scores = torch.tensor([[0.5, float("nan"), 0.9, 0.1], [0.7, float("nan"), 0.2, 0.3]])
    candidates = torch.tensor([[True, True, True, True], [True, False, True, True]])
    assert target_ranks(scores, torch.tensor([0, 0]), candidates).tolist() == [3, 1]
    assert target_ranks(scores[:1], torch.tensor([0])).tolist() == [3]
