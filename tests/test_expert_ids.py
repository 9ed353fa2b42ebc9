"""The expert-id range at its boundary: id E - 1 is the last expert, id E is refused with a clear error.

Both places that validate ids are checked through the public API: the static router (``model(..., expert_ids=)``,
or ``domain_ids`` with ``router_options={"key": ...}``) and ``grouped_lora`` with a plain id tensor (its
``ExpertPlan``). Without the check an id of E is silently the base model (``loop``) or an index error deep in
a kernel.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moa
from moa import MoAConfig
from moa.experts import grouped_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

E = 3


@pytest.fixture(scope="module")
def head_model():
    """A tiny Llama whose only MoA layer is lm_head, with random experts, and the same base model alone."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    base = LlamaForCausalLM(config).eval()
    pristine = LlamaForCausalLM(config).eval()
    pristine.load_state_dict(base.state_dict())
    models = {}
    for key in ("expert_ids", "domain_ids"):
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(base.state_dict())
        moa_config = MoAConfig(n_experts=E, r=2, alpha=4, router="static", target_modules=["lm_head"],
                               router_options={"key": key})
        models[key] = moa.attach(model, moa_config)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            pool = models[key].moa_layers()["lm_head"].pool
            pool.lora_B.copy_(torch.randn(pool.lora_B.shape, generator=g))
    return models, pristine


def expected_logits(pristine, ids, experts, pool) -> torch.Tensor:
    """lm_head's input from the base model, plus ``s * B_e A_e h`` for each token's expert, computed directly."""
    with torch.no_grad():
        out = pristine(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[-1]  # the normed hidden state lm_head reads
        A, B = pool.A.detach(), pool.B.detach()
        delta = torch.einsum("btr,btor->bto", torch.einsum("btd,btrd->btr", h, A[experts]), B[experts])
    return out.logits + pool.scaling * delta


@pytest.mark.parametrize("key", ["expert_ids", "domain_ids"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_static_router_id_boundary(head_model, key, per_token):
    models, pristine = head_model
    model = models[key]
    pool = model.moa_layers()["lm_head"].pool
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    experts = torch.tensor([[0, 1, 2, 2, 1], [2, 2, 2, 2, 2]]) if per_token else torch.tensor([[0] * 5, [E - 1] * 5])
    route = experts if per_token else experts[:, 0]
    with torch.no_grad():
        got = model(input_ids=ids, **{key: route}).logits
    torch.testing.assert_close(got, expected_logits(pristine, ids, experts, pool), atol=1e-5, rtol=1e-5)
    assert (got[1] - pristine(input_ids=ids).logits[1]).abs().max() > 1e-2  # expert E - 1 does something

    bad = route.clone()
    bad.view(-1)[-1] = E  # the last token (or sample)
    with pytest.raises(ValueError, match=rf"{key} must lie in \[-1, {E - 1}\].*got values in \[0, {E}\]"):
        model(input_ids=ids, **{key: bad})
    with torch.no_grad():  # the refused call left nothing behind
        torch.testing.assert_close(model(input_ids=ids, **{key: route}).logits, got, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["loop", "dense", "grouped"])
def test_grouped_lora_id_boundary(impl):
    g = torch.Generator().manual_seed(0)
    n, d, r, s = 6, 8, 2, 0.5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = torch.randn(E, r, d, generator=g, dtype=torch.float64)
    B = torch.randn(E, d, r, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 1, E - 1]).view(n, 1)
    w = torch.rand(n, 1, generator=g, dtype=torch.float64)
    expected = torch.stack([w[i, 0] * s * B[e] @ (A[e] @ x[i]) for i, e in enumerate(ids[:, 0].tolist())])
    torch.testing.assert_close(grouped_lora(x, A, B, ids, w, s, impl=impl), expected)
    for bad_id, got in ((E, rf"\[0, {E}\]"), (-1, rf"\[-1, {E - 1}\]")):
        bad = ids.clone()
        bad[-1] = bad_id
        with pytest.raises(ValueError, match=rf"expert_ids must lie in \[0, {E - 1}\].*got values in {got}"):
            grouped_lora(x, A, B, bad, w, s, impl=impl)
