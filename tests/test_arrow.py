"""Arrow (training-free token-wise routing over LoRA experts) against PEFT's own ``create_arrow_model`` and a direct
computation, its prototype cache, and the ``uniform`` mixture.

The PEFT adapters are built with known singular values: A has orthonormal rows and B orthogonal columns scaled by
``SINGULAR``, so each ``dW = B A`` has singular values ``SINGULAR`` (ratio 0.3 between the top two). PEFT's 15
power-iteration steps then reach the top singular vector to ~0.3^30, far below float32 precision, and its
prototypes equal moa's exact ones; with close singular values they would not (PEFT's approximation, not Arrow).
"""

from __future__ import annotations

import copy

import pytest
import torch

import moa
from moa.experts import LoRAPool
from moa.routers import RoutingContext, arrow

TARGETS = ["q_proj", "v_proj", "down_proj"]
SINGULAR = torch.tensor([1.0, 0.3, 0.1, 0.03])  # r = 4


def tiny_llama():
    from moa.pipelines.kinds.causal_lm.module import build_causal_lm

    return build_causal_lm("tiny-llama", {}, 0).eval()


def orthonormal_rows(rows: int, cols: int, generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=generator))
    return q.T.contiguous()


def save_adapters(base, folder, n: int, seed: int = 0, scale: float = 1.0, prefix: str = "expert") -> list[str]:
    """``n`` PEFT LoRA adapters (r=4, alpha=8) on TARGETS with random singular vectors and the values SINGULAR
    (A and B times ``scale``)."""
    from peft import LoraConfig, get_peft_model

    generator = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        with torch.no_grad():
            for name, module in model.named_modules():
                if hasattr(module, "lora_A") and "default" in module.lora_A:
                    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                    a.copy_(orthonormal_rows(4, a.shape[1], generator) * scale)
                    b.copy_(orthonormal_rows(4, b.shape[0], generator).T * SINGULAR * (0.5 + i * 0.2) * scale)
        model.save_pretrained(str(folder / f"{prefix}{i}"))
        paths.append(str(folder / f"{prefix}{i}"))
    return paths


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    base = tiny_llama()
    return base, save_adapters(base, tmp_path_factory.mktemp("arrow"), 4)


def padded_batch():
    """Three rows of 9, 5 and 2 tokens, right-padded."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (3, 9), generator=generator)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, length in enumerate((9, 5, 2)):
        mask[row, :length] = 1
    return ids, mask


@pytest.mark.parametrize("top_k, temperature", [(2, 1.0), (1, 1.0), (4, 0.5)])
def test_arrow_pool_equals_peft_create_arrow_model(experts, top_k, temperature):
    from peft import ArrowConfig, create_arrow_model

    base, paths = experts
    peft_model = create_arrow_model(copy.deepcopy(base), paths, ArrowConfig(top_k=top_k, router_temperature=temperature,
                                                                           rng_seed=0)).eval()
    ours = moa.from_peft(copy.deepcopy(base), paths, router="arrow", top_k=top_k,
                         router_options={"temperature": temperature}).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (expected[real] - plain[real]).abs().max() > 1e-2  # the experts change the output
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    # the prototypes themselves: PEFT's power iteration and moa's SVD give the same unit vectors (up to sign)
    for name, layer in ours.moa_layers().items():
        theirs = peft_model.get_submodule(f"base_model.model.{name}").lora_arrow["arrow_router"].prototypes
        cosine = (layer.router._prototypes * theirs).sum(-1).abs()
        torch.testing.assert_close(cosine, torch.ones(4), atol=1e-5, rtol=0)


def test_gen_know_sub_equals_peft_use_gks(experts, tmp_path):
    """GenKnowSub (library assembly): the experts less the general adapters' mean A and B, as PEFT's use_gks. The
    general adapters are small (A and B x 0.05), so the experts keep well-separated singular values (see above)."""
    from peft import ArrowConfig, create_arrow_model

    from moa.pipelines.tracking.expert_library import gen_know_sub

    base, paths = experts
    general = save_adapters(base, tmp_path, 2, seed=3, scale=0.05, prefix="general")
    peft_model = create_arrow_model(copy.deepcopy(base), paths, ArrowConfig(top_k=2, use_gks=True, rng_seed=0),
                                    general_adapter_paths=general).eval()
    purified = gen_know_sub({f"e{i}": p for i, p in enumerate(paths)}, general, tmp_path / "gks")
    ours = moa.from_peft(copy.deepcopy(base), purified, router="arrow", top_k=2).eval()
    plain = moa.from_peft(copy.deepcopy(base), paths, router="arrow", top_k=2).eval()
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits[real]
        got = ours(input_ids=ids, attention_mask=mask).logits[real]
        without = plain(input_ids=ids, attention_mask=mask).logits[real]
    assert (expected - without).abs().max() > 1e-3  # the subtraction changes the answer
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="other modules or ranks"):
        gen_know_sub({"e0": paths[0]}, _other_targets(base, tmp_path), tmp_path / "bad")  # q_proj only
    assert not (tmp_path / "bad").exists()


def _other_targets(base, folder) -> list[str]:
    from peft import LoraConfig, get_peft_model

    get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(folder / "q"))
    return [str(folder / "q")]


def direct_arrow(x, A, B, scaling, top_k, temperature):
    """Arrow by its definition: the full dW_e, its SVD, the scores, the top-k softmax and the weighted updates."""
    x, A, B = x.double(), A.double(), B.double()
    delta = torch.einsum("eor,eri->eoi", B, A)  # [E, d_out, d_in]
    protos = torch.stack([torch.linalg.svd(d)[2][0] for d in delta])
    scores = (x @ protos.T).abs()
    top, ids = scores.topk(top_k, dim=-1)
    weights = torch.softmax(top / temperature, dim=-1)
    out = torch.einsum("nk,nko->no", weights, torch.einsum("eoi,ni->neo", delta, x)[torch.arange(len(x))[:, None], ids])
    return ids, weights, scaling * out


def random_pool(n_experts=5, r=3, d_in=12, d_out=7, seed=0):
    torch.manual_seed(seed)
    pool = LoRAPool(d_in, d_out, n_experts, r, alpha=2 * r)
    with torch.no_grad():
        pool.lora_B.normal_()
    return pool


def test_routing_and_update_equal_the_definition():
    pool = random_pool()
    router = arrow.ArrowRouter(12, 5, top_k=3, temperature=0.7)
    x = torch.randn(10, 12)
    routing = router(x, RoutingContext(), pool)
    ids, weights, update = direct_arrow(x, pool.A, pool.B, pool.scaling, 3, 0.7)
    assert torch.equal(routing.expert_ids, ids)
    torch.testing.assert_close(routing.weights.double(), weights)
    torch.testing.assert_close(pool(x, routing.expert_ids, routing.weights).double(), update, atol=1e-5, rtol=1e-5)
    # top_k = E: every expert, as dense weights
    dense = arrow.ArrowRouter(12, 5, top_k=5)(x, RoutingContext(), pool)
    ids, weights, _ = direct_arrow(x, pool.A, pool.B, pool.scaling, 5, 1.0)
    assert dense.expert_ids is None
    torch.testing.assert_close(dense.weights.double(), torch.zeros(10, 5, dtype=torch.double).scatter(1, ids, weights))
    # an expert with dW = 0 has the prototype 0: score 0, chosen only when nothing else is left
    with torch.no_grad():
        pool.B[4].zero_()
    routing = arrow.ArrowRouter(12, 5, top_k=4)(x, RoutingContext(), pool)
    assert not (routing.expert_ids == 4).any()


def counting_svd(monkeypatch) -> list:
    calls = []
    real = arrow.top_right_singular_vector

    def counted(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(arrow, "top_right_singular_vector", counted)
    return calls


def test_a_pool_with_one_more_expert_computes_one_prototype_per_layer(experts, tmp_path, monkeypatch):
    base, _ = experts
    paths = save_adapters(base, tmp_path, 4, seed=7)  # factors this process has not seen before
    calls = counting_svd(monkeypatch)
    ids, mask = padded_batch()
    first = moa.from_peft(copy.deepcopy(base), paths[:3], router="arrow", top_k=2)
    first(input_ids=ids, attention_mask=mask)
    n_layers = len(first.moa_layers())
    assert len(calls) == 3 * n_layers
    hashed, key = [], arrow._expert_key
    monkeypatch.setattr(arrow, "_expert_key", lambda a, b: hashed.append(1) or key(a, b))
    first(input_ids=ids[:1], attention_mask=mask[:1])  # nothing changed: nothing recomputed, nothing even hashed
    assert len(calls) == 3 * n_layers and not hashed
    bigger = moa.from_peft(copy.deepcopy(base), paths, router="arrow", top_k=2)
    bigger(input_ids=ids, attention_mask=mask)
    assert len(calls) == 4 * n_layers  # the three known experts' prototypes are reused

    # changing one expert's weights (in place, as an optimizer or load_state_dict does) recomputes its own only
    layer = bigger.moa_layers()["model.layers.0.self_attn.q_proj"]
    before = layer.router._prototypes.clone()
    with torch.no_grad():
        layer.pool.B[1].copy_(torch.randn_like(layer.pool.B[1]))
    bigger(input_ids=ids, attention_mask=mask)
    assert len(calls) == 4 * n_layers + 1
    after = layer.router._prototypes
    assert torch.equal(after[[0, 2, 3]], before[[0, 2, 3]]) and not torch.allclose(after[1], before[1])
    expected = arrow.top_right_singular_vector(layer.pool.A[1], layer.pool.B[1]).float()
    torch.testing.assert_close(after[1], expected)


def test_uniform_is_the_mean_of_the_experts_outputs():
    pool = random_pool()
    router = arrow.UniformRouter(12, 5, 1)
    x = torch.randn(6, 12)
    routing = router(x, RoutingContext(), pool)
    each = [pool(x, torch.full((6, 1), e), torch.ones(6, 1)) for e in range(5)]
    torch.testing.assert_close(pool(x, routing.expert_ids, routing.weights), torch.stack(each).mean(0))
    assert moa.MoAConfig(n_experts=3, router="uniform", top_k=3).top_k == 1  # it reads no top_k


def test_arrow_refuses_what_it_cannot_route(experts):
    base, paths = experts
    with pytest.raises(ValueError, match="top_k must be between 1 and n_experts=4"):
        moa.from_peft(copy.deepcopy(base), paths, router="arrow", top_k=5)
    with pytest.raises(ValueError, match="expert_kind must be 'lora', got 'hyper'"):
        moa.attach(copy.deepcopy(base), moa.MoAConfig(n_experts=2, r=2, router="arrow", expert_kind="hyper",
                                                      target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        moa.from_peft(copy.deepcopy(base), paths, router="arrow", router_options={"temperature": 0})
    with pytest.raises(ValueError, match="top_k must be between 1 and the number of experts"):
        arrow.ArrowRouter(12, 3, top_k=4)
    with pytest.raises(ValueError, match="stored LoRA experts"):
        arrow.ArrowRouter(12, 3, top_k=1)(torch.randn(2, 12), RoutingContext(), torch.nn.Linear(12, 3))
