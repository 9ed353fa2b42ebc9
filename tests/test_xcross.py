"""X-Cross: the ``xcross`` stream router, the integrator's equations, and the X-Cross recommender.

Tiny BERT encoders built from configs and generated catalogues and splits; nothing is downloaded.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import BertConfig, BertModel

import moa
from moa import MoAConfig
from moa.recsys.data import LeaveOneOut, left_pad
from moa.recsys.encoders import mean_pool, plain_copy
from moa.recsys.evaluate import evaluate
from moa.recsys.loading import load_recommender
from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender
from moa.recsys.xcross import XCrossIntegrator, XCrossItemEncoder, build_xcross
from moa.routers import ROUTERS

VOCAB, HIDDEN = 100, 32
CONFIG = RecommenderConfig(adapted_layers=2, r=4, alpha=8, hidden=16, user_layers=1, heads=2, inner=32,
                           dropout=0.0, max_len=8)
DOMAINS = ("a", "b", "c", "target")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_bert(seed: int = 0, layers: int = 3) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    return BertModel(config).eval()


def catalogue(n_items: int, seed: int, width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n_items + 1, width), generator=g)
    lengths = torch.randint(3, width + 1, (n_items + 1,), generator=g)
    lengths[0] = 2
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return ids * mask, mask


def source_model(seed: int = 0) -> TextSeqRecommender:
    """A trained-looking domain-expert model: 4 domains, random non-zero experts and heads."""
    model = TextSeqRecommender.build(list(DOMAINS), config=CONFIG, backbone=tiny_bert(seed))
    for i, d in enumerate(DOMAINS):
        model.add_catalogue(d, *catalogue(10 + i, seed=20 + i))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.item_encoder.top.moa_layers().values():
            layer.pool.lora_B.copy_(torch.randn(layer.pool.lora_B.shape, generator=g) * 0.3)
    return model.eval()


def randomize_integrator(encoder: XCrossItemEncoder, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.integrator.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def cyclic_split(n_items: int, users: int = 40, length: int = 9, domain: str = "target") -> LeaveOneOut:
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, n_items, (users,), generator=g)
    seqs = tuple((s + torch.arange(length)) % n_items + 1 for s in starts)
    return LeaveOneOut(tuple(f"u{i}" for i in range(users)), seqs, n_items, domain)


# -- the router --------------------------------------------------------------------------------------------------


def test_xcross_router_routes_stacked_stream_s_to_expert_s_like_static_routing():
    assert "xcross" in ROUTERS
    base = tiny_bert()
    static = moa.attach(copy.deepcopy(base), MoAConfig(n_experts=3, r=4, router="static", target_modules=["query", "value"]))
    streams = moa.attach(copy.deepcopy(base), MoAConfig(n_experts=3, r=4, router="xcross", target_modules=["query", "value"]))
    streams.load_state_dict(static.state_dict())
    with torch.no_grad():
        for layer in static.moa_layers().values():
            layer.pool.lora_B.normal_(std=0.3)
        streams.load_state_dict(static.state_dict())
    ids = torch.randint(3, VOCAB, (2, 5))
    stacked = ids.repeat(3, 1)  # stream-major: rows [2s, 2s + 2) are stream s
    with torch.no_grad():
        got = streams(input_ids=stacked).last_hidden_state
        want = static(input_ids=stacked, expert_ids=torch.arange(3).repeat_interleave(2)).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got[:2], got[2:4], atol=1e-4)  # the streams really use different experts
    with pytest.raises(ValueError, match="multiple of 3"):
        streams(input_ids=ids)


# -- the integrator ----------------------------------------------------------------------------------------------


def test_refine_matches_the_equations_written_out_per_stream():
    n, d = 3, 8
    integrator = XCrossIntegrator(n, d, n_layers=1, beta=0.7, gamma=1.3)
    with torch.no_grad():
        for p in integrator.parameters():
            p.normal_()
    h = torch.randn(n, 2, 5, d)
    got = integrator.refine(0, h)
    weight, bias = integrator.scaling[0].weight, integrator.scaling[0].bias
    z = h.permute(1, 2, 0, 3).reshape(2, 5, n * d) @ (weight / (n * d) ** 0.5).T + bias  # [B, T, 2 n (n-1)]
    pairs = [(m, o) for m in range(n) for o in range(n) if o != m]
    want = torch.empty_like(h)
    for m in range(n):
        out = h[m].clone()
        for o in range(n):
            if o == m:
                continue
            j = pairs.index((m, o))
            direct, difference = z[..., j : j + 1], z[..., n * (n - 1) + j : n * (n - 1) + j + 1]
            out = out + 0.7 * direct * h[o] + 1.3 * difference * (h[m] - h[o])
        want[m] = out
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(integrator.combine(h), torch.einsum("m,mbtd->btd", integrator.stream_weights, h))
    # parameter count: per layer n*d -> 2n(n-1) with bias, plus n stream weights
    assert sum(p.numel() for p in integrator.parameters()) == (n * d + 1) * 2 * n * (n - 1) + n


def test_zeroed_integrator_with_one_hot_weights_equals_that_source_model():
    source = source_model()
    xmodel = build_xcross(source, "target")
    encoder = xmodel.item_encoder
    assert encoder.sources == ["a", "b", "c"]
    for j, name in enumerate(encoder.sources):
        with torch.no_grad():
            encoder.integrator.stream_weights.copy_(torch.nn.functional.one_hot(torch.tensor(j), 3).float())
        xmodel.clear_cache()
        got = xmodel.item_table("target")
        want = source.item_encoder.encode("target", torch.arange(14), expert_ids=source.domains.index(name))
        assert torch.allclose(got, want, atol=1e-5), name
    # and, with that source's user encoder, the whole recommender scores like the source model on the target
    xmodel = build_xcross(source, "target", head_from="b")
    with torch.no_grad():
        xmodel.item_encoder.integrator.stream_weights.copy_(torch.tensor([0.0, 1.0, 0.0]))
    xmodel.clear_cache()
    histories = left_pad([[1, 2, 3], [9, 4]])
    want = source.head("b")(source.head("b").item_vectors(want_table := source.item_encoder.encode(
        "target", torch.arange(14), expert_ids=1))[histories] * (histories != 0)[..., None], histories != 0)[:, -1]
    assert torch.allclose(xmodel.score(histories, "target")[:, 1:], (want @ source.head("b").item_vectors(want_table).T)[:, 1:], atol=1e-4)


def test_lockstep_streams_match_n_separate_models_refined_layer_by_layer():
    """Reference: n plain encoders, expert m merged into model m, run layer by layer with the equations."""
    source = source_model()
    xmodel = build_xcross(source, "target", beta=0.8, gamma=0.6)
    encoder = xmodel.item_encoder
    randomize_integrator(encoder)
    ids, mask = encoder.catalogues["target"]
    models = []
    for name in encoder.sources:
        reference = plain_copy(source.item_encoder.backbone)
        expert = torch.nn.functional.one_hot(torch.tensor(source.domains.index(name)), len(DOMAINS)).float()
        with torch.no_grad():
            for path, layer in source.item_encoder.top.moa_layers().items():
                index = int(path.split(".")[1]) + source.item_encoder.split
                target = reference.get_submodule(f"encoder.layer.{index}." + path.split(".", 2)[2])
                target.weight.copy_(layer.merged_weight(expert))
        models.append(reference)
    from transformers.masking_utils import create_bidirectional_mask

    with torch.no_grad():
        hidden = [m.embeddings(input_ids=ids) for m in models]
        attention = create_bidirectional_mask(config=models[0].config, inputs_embeds=hidden[0], attention_mask=mask)
        for index in range(3):
            hidden = [m.encoder.layer[index](h, attention) for m, h in zip(models, hidden)]
            if index >= encoder.split:  # integration at every adapted layer
                hidden = list(encoder.integrator.refine(index - encoder.split, torch.stack(hidden)))
        want = mean_pool(encoder.integrator.combine(torch.stack(hidden)), mask)
    assert torch.allclose(xmodel.item_table("target"), want, atol=1e-5)


# -- training and persistence ------------------------------------------------------------------------------------


def test_only_the_integrator_and_the_target_head_train():
    source = source_model()
    xmodel = build_xcross(source, "target")
    frozen = {n: p.detach().clone() for n, p in xmodel.named_parameters()}
    trainable = {n for n, p in xmodel.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("item_encoder.integrator.", "heads.0.")) for n in trainable)
    split = cyclic_split(13)
    before = evaluate(xmodel, split.test, ks=(10,))["NDCG@10"]
    result = xmodel.fit(split, epochs=10, lr=5e-3, encoder_lr=1e-2, batch_size=16, negatives=4, patience=10)
    assert result["history"][-1]["loss"] < result["history"][1]["loss"]
    assert evaluate(xmodel, split.test, ks=(10,))["NDCG@10"] > before + 0.2
    moved = {n for n, p in xmodel.named_parameters() if not torch.equal(p, frozen[n])}
    assert moved and moved <= trainable
    assert any(n.startswith("item_encoder.integrator.scaling") for n in moved)
    counts = xmodel.parameter_counts()
    n, layers = 3, CONFIG.adapted_layers
    assert counts["encoder"] == layers * (n * HIDDEN + 1) * 2 * n * (n - 1) + n
    # the source model is untouched
    assert all(not p.requires_grad for p in xmodel.item_encoder.top.parameters())


def test_xcross_recommender_saves_and_loads_without_the_source_model(tmp_path):
    source = source_model()
    xmodel = build_xcross(source, "target", sources=["c", "a"], beta=0.5, gamma=2.0)
    randomize_integrator(xmodel.item_encoder)
    xmodel.eval()
    histories = left_pad([[1, 2, 3], [9, 4], [13]])
    expected = xmodel.score(histories, "target")
    xmodel.save(tmp_path)
    loaded = load_recommender(tmp_path)
    assert isinstance(loaded.item_encoder, XCrossItemEncoder) and loaded.item_encoder.sources == ["c", "a"]
    assert loaded.item_encoder.integrator.beta == 0.5 and loaded.item_encoder.integrator.gamma == 2.0
    assert torch.allclose(loaded.score(histories, "target"), expected, atol=1e-5)


def test_bad_xcross_requests_are_refused():
    source = source_model()
    with pytest.raises(ValueError, match="cannot be one of its own sources"):
        build_xcross(source, "target", sources=["a", "target"])
    with pytest.raises(ValueError, match="unknown domain"):
        build_xcross(source, "target", sources=["a", "zzz"])
    with pytest.raises(ValueError, match="at least 2"):
        build_xcross(source, "target", sources=["a"])
    frozen = TextSeqRecommender.build(["a", "b"], config=CONFIG, backbone=tiny_bert(), experts=False)
    with pytest.raises(ValueError, match="domain-expert recommender"):
        build_xcross(frozen, "b", sources=["a"])
