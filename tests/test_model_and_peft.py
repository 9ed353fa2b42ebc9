"""MoAModel end to end on tiny transformers models: config validation, attach, save/load, the static router,
PEFT interop (from_peft / to_peft) and merging.

Every model here is built from a config (hidden size 32, 2 layers, vocab 100): nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may touch the network

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

import moa
from moa import MoAConfig, MoALinear
from moa.config import CONFIG_NAME
from moa.atomic import MANIFEST
from moa.model import WEIGHTS_NAME, load_moa_state

VOCAB = 100


# -- tiny models ------------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # larger than the default so routes give clearly different logits
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    return BertModel(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def run(model, **kwargs) -> torch.Tensor:
    """Main output tensor of a forward call (logits, or the last hidden state of an encoder), no grad."""
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def randomize_experts(moa_model, seed: int = 123, std: float = 0.3) -> None:
    """Give every expert a non-zero B (at init B = 0, so every route is the base model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moa_model.moa_layers().values():
            b = layer.pool.lora_B
            b.copy_(torch.randn(b.shape, generator=g) * std)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def llama():
    """A pristine tiny Llama; tests must deepcopy it (attach modifies a model in place)."""
    return tiny_llama()


def fresh(model):
    return copy.deepcopy(model)


# -- 1. configuration and attach errors ---------------------------------------------------------------------------


def test_config_unknown_router():
    with pytest.raises(ValueError, match=r"unknown router 'nope'.*static.*topk"):
        MoAConfig(router="nope")


def test_config_top_k_larger_than_n_experts():
    with pytest.raises(ValueError, match=r"top_k must be between 1 and n_experts=4, got 5"):
        MoAConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        MoAConfig(n_experts=4, top_k=0)
    # the static router always uses one expert per request
    assert MoAConfig(n_experts=4, top_k=3, router="static").top_k == 1


@pytest.mark.parametrize("r", [0, -1, 2.0])
def test_config_rank_must_be_positive_integer(r):
    with pytest.raises(ValueError, match=r"r \(the rank of each expert\) must be an integer >= 1"):
        MoAConfig(r=r)


def test_config_other_field_errors():
    with pytest.raises(ValueError, match="n_experts"):
        MoAConfig(n_experts=0)
    with pytest.raises(ValueError, match="alpha"):
        MoAConfig(alpha=0)
    with pytest.raises(ValueError, match="dropout"):
        MoAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="impl"):
        MoAConfig(impl="cuda-magic")
    with pytest.raises(ValueError, match="expert_names"):
        MoAConfig(n_experts=2, expert_names=["a", "a"])
    with pytest.raises(ValueError, match="target_modules"):
        MoAConfig(target_modules=[])


def test_config_dict_round_trip():
    config = MoAConfig(
        n_experts=3, r=4, alpha=12.0, router="topk", top_k=2, target_modules=["q_proj", "o_proj"],
        dropout=0.1, router_options={"aux_loss_coef": 0.05}, impl="dense", expert_names=["x", "y", "z"],
    )
    data = config.to_dict()
    assert data["n_experts"] == 3 and data["router_options"] == {"aux_loss_coef": 0.05}
    assert MoAConfig.from_dict(data) == config
    # it survives JSON (that is how it is saved)
    assert MoAConfig.from_dict(json.loads(json.dumps(data))) == config
    assert config.scaling == pytest.approx(3.0)


def test_config_from_dict_unknown_field():
    data = MoAConfig().to_dict()
    data["n_expert"] = 2  # a typo must not pass silently
    with pytest.raises(ValueError, match=r"unknown MoAConfig fields \['n_expert'\]"):
        MoAConfig.from_dict(data)


def test_attach_targets_matching_nothing_lists_linear_layers(llama):
    model = fresh(llama)
    with pytest.raises(ValueError, match="no linear layer matches") as info:
        moa.attach(model, MoAConfig(target_modules=["not_a_layer"]))
    message = str(info.value)
    assert "not_a_layer" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message
    # the failed attach left the model untouched
    assert not any(isinstance(m, MoALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_attach_non_linear_target_is_rejected(llama):
    with pytest.raises(ValueError, match="linear layers only"):
        moa.attach(fresh(llama), MoAConfig(target_modules=["model.layers.0.self_attn"]))


def test_attach_twice_is_rejected(llama):
    model = fresh(llama)
    moa_model = moa.attach(model, MoAConfig())
    with pytest.raises(ValueError, match="already carries MoA layers"):
        moa.attach(moa_model, MoAConfig())
    with pytest.raises(ValueError, match="already carries MoA layers"):
        moa.attach(model, MoAConfig())  # the wrapped model itself, modified in place
    with pytest.raises(ValueError, match="already carries MoA layers"):
        moa.attach(model, MoAConfig(target_modules=["o_proj"]))  # even on other layers
    assert len(moa_model.moa_layers()) == 4


# -- 2. attach on three architectures ---------------------------------------------------------------------------

ARCHS = {
    "llama": (tiny_llama, ("q_proj", "v_proj"), torch.nn.Linear),
    "bert": (tiny_bert, ("query", "value"), torch.nn.Linear),
    "gpt2": (tiny_gpt2, ("c_attn",), Conv1D),
}


def arch_inputs(arch: str) -> dict:
    ids = token_ids(batch=2, length=6)
    if arch == "bert":  # padding in the second sample, to route with a token mask
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_attach_default_targets(arch):
    build, suffixes, base_type = ARCHS[arch]
    base = build()
    pristine = fresh(base)
    config = MoAConfig(n_experts=4, r=4, top_k=2)
    moa_model = moa.attach(base, config)
    assert moa_model.model is base  # in place, like peft.get_peft_model
    layers = moa_model.moa_layers()

    # the default targets (PEFT's table): every match, and nothing else, is a MoA layer
    expected = sorted(
        n for n, m in pristine.named_modules() if isinstance(m, base_type) and n.rsplit(".", 1)[-1] in suffixes
    )
    assert sorted(layers) == expected and len(expected) == 2 * len(suffixes)
    for layer in layers.values():
        assert isinstance(layer.base_layer, base_type)

    # only MoA parameters train: the pools and the routers' gates
    trainable = {n for n, p in moa_model.named_parameters() if p.requires_grad}
    expected_trainable = set()
    n_expected = 0
    for name, layer in layers.items():
        expected_trainable |= {f"model.{name}.pool.lora_A", f"model.{name}.pool.lora_B", f"model.{name}.router.gate.weight"}
        n_expected += 4 * 4 * (layer.in_features + layer.out_features) + 4 * layer.in_features
    assert trainable == expected_trainable
    assert sum(p.numel() for n, p in moa_model.named_parameters() if p.requires_grad) == n_expected
    assert sum(p.numel() for p in moa_model.parameters()) == sum(p.numel() for p in pristine.parameters()) + n_expected
    groups = moa_model.param_groups()
    assert set(groups) == {"experts", "router"}
    assert sum(p.numel() for ps in groups.values() for p in ps) == n_expected

    # at init B = 0: exactly the base model
    inputs = arch_inputs(arch)
    base_out = run(pristine, **inputs)
    assert torch.equal(run(moa_model, **inputs), base_out)

    # gradients reach the experts and nothing of the base model
    moa_model.train()
    run_out = moa_model(**inputs)
    out = run_out.logits if hasattr(run_out, "logits") else run_out.last_hidden_state
    out.pow(2).mean().backward()
    moa_model.eval()
    for layer in layers.values():
        assert layer.pool.lora_B.grad is not None and layer.pool.lora_B.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in moa_model.named_parameters() if not p.requires_grad)

    # non-zero experts change the output; disable_adapters gives the base model back
    randomize_experts(moa_model)
    moa_out = run(moa_model, **inputs)
    assert moa_out.shape == base_out.shape
    assert max_diff(moa_out, base_out) > 1e-3
    with moa_model.disable_adapters():
        assert torch.allclose(run(moa_model, **inputs), base_out, atol=1e-6)
    assert torch.equal(run(moa_model, **inputs), moa_out)


# -- 3. save / load ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["topk", "static"])
def test_save_load_round_trip(llama, tmp_path, router):
    config = MoAConfig(n_experts=3, r=4, alpha=8, router=router, top_k=2, target_modules=["q_proj", "v_proj", "down_proj"])
    moa_model = moa.attach(fresh(llama), config)
    randomize_experts(moa_model)
    kwargs = {"input_ids": token_ids(batch=3)}
    if router == "static":
        kwargs["expert_ids"] = [2, 0, 1]
    expected = run(moa_model, **kwargs)

    out_dir = moa_model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, MANIFEST])
    assert CONFIG_NAME == "moa_config.json" and WEIGHTS_NAME == "moa_model.safetensors"
    meta = json.loads((out_dir / CONFIG_NAME).read_text())
    assert meta["config"] == config.to_dict()
    assert meta["base_model_type"] == "llama"
    assert meta["layers"] == sorted(moa_model.moa_layers())

    loaded = moa.load(out_dir, fresh(llama))
    assert isinstance(loaded, moa.MoAModel)
    assert loaded.config == config
    assert sorted(loaded.moa_layers()) == sorted(moa_model.moa_layers())
    original_state, loaded_state = moa_model.moa_state_dict(), loaded.moa_state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)
    if router == "topk":
        assert any(".router.gate.weight" in k for k in loaded_state)
    assert torch.equal(run(loaded.eval(), **kwargs), expected)
    # the loaded model is trainable like a freshly attached one
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in moa_model.named_parameters() if p.requires_grad
    }


def test_save_overwrites_previous_save(llama, tmp_path):
    moa_model = moa.attach(fresh(llama), MoAConfig(n_experts=2, r=2, router="static"))
    randomize_experts(moa_model, seed=1)
    moa_model.save_pretrained(tmp_path)
    randomize_experts(moa_model, seed=2)
    moa_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, MANIFEST])  # no temp files left
    kwargs = {"input_ids": token_ids(), "expert_ids": [0, 1]}
    assert torch.equal(run(moa.load(tmp_path, fresh(llama)), **kwargs), run(moa_model, **kwargs))


def test_load_into_wrong_base_model(llama, tmp_path):
    moa_model = moa.attach(fresh(llama), MoAConfig(n_experts=2, r=2))
    moa_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has shape .* the model expects"):
        moa.load(tmp_path, tiny_llama(hidden=48))
    with pytest.raises(ValueError, match="not the model these MoA layers were saved from"):
        moa.load(tmp_path, tiny_gpt2())


def test_load_missing_directory(llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved MoA model"):
        moa.load(tmp_path / "does-not-exist", fresh(llama))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        moa.load(tmp_path / "empty", fresh(llama))


# -- 4. the static router ---------------------------------------------------------------------------------------


def static_llama(llama, impl: str = "auto", n_experts: int = 3, **kw):
    config = MoAConfig(n_experts=n_experts, r=4, router="static", impl=impl, target_modules=["q_proj", "v_proj", "up_proj"], **kw)
    moa_model = moa.attach(fresh(llama), config)
    randomize_experts(moa_model)
    return moa_model


@pytest.mark.parametrize("impl", ["auto", "dense", "grouped", "loop"])
def test_static_mixed_batch_equals_one_request_at_a_time(llama, impl):
    moa_model = static_llama(llama, impl=impl)
    ids = token_ids(batch=4, length=5)
    routes = [2, 0, 1, 0]
    mixed = run(moa_model, input_ids=ids, expert_ids=routes)
    alone = [run(moa_model, input_ids=ids[i : i + 1], expert_ids=[e]) for i, e in enumerate(routes)]
    for i in range(len(routes)):
        assert torch.allclose(mixed[i], alone[i][0], atol=1e-5), f"sample {i}"
    # and the experts really differ from each other and from the base model
    base = run(llama, input_ids=ids)
    for e in range(3):
        out_e = run(moa_model, input_ids=ids, expert_ids=[e] * 4)
        assert max_diff(out_e, base) > 1e-2
        for f in range(e):
            assert max_diff(out_e, run(moa_model, input_ids=ids, expert_ids=[f] * 4)) > 1e-2
    # per-token ids that are constant within each sample are the per-sample route
    per_token = torch.tensor(routes)[:, None].expand(4, 5)
    assert torch.allclose(run(moa_model, input_ids=ids, expert_ids=per_token), mixed, atol=1e-6)


def test_static_minus_one_is_the_base_model(llama):
    moa_model = static_llama(llama)
    ids = token_ids(batch=3)
    base = run(llama, input_ids=ids)
    out = run(moa_model, input_ids=ids, expert_ids=[-1, 1, -1])
    assert torch.allclose(out[0], base[0], atol=1e-6)
    assert torch.allclose(out[2], base[2], atol=1e-6)
    assert max_diff(out[1], base[1]) > 1e-2
    assert torch.allclose(run(moa_model, input_ids=ids, expert_ids=[-1, -1, -1]), base, atol=1e-6)


def test_static_needs_expert_ids(llama):
    moa_model = static_llama(llama)
    with pytest.raises(ValueError, match="expert_ids"):
        run(moa_model, input_ids=token_ids())


@pytest.mark.parametrize("bad", [[0, 3], [-2, 0]])
def test_static_out_of_range_id(llama, bad):
    moa_model = static_llama(llama)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 2\]"):
        run(moa_model, input_ids=token_ids(), expert_ids=bad)


def test_static_bad_context_shapes_and_types(llama):
    moa_model = static_llama(llama)
    with pytest.raises(TypeError, match="integer"):
        run(moa_model, input_ids=token_ids(), expert_ids=[0.0, 1.0])
    with pytest.raises(ValueError, match="fits neither"):
        run(moa_model, input_ids=token_ids(batch=2), expert_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="3 weights per sample"):
        run(moa_model, input_ids=token_ids(batch=2), expert_weights=[[1.0, 0.0], [0.0, 1.0]])


def test_static_one_hot_weights_equal_ids(llama):
    moa_model = static_llama(llama)
    ids = token_ids(batch=3)
    routes = [1, 2, 0]
    one_hot = torch.nn.functional.one_hot(torch.tensor(routes), 3).float()
    by_ids = run(moa_model, input_ids=ids, expert_ids=routes)
    assert torch.allclose(run(moa_model, input_ids=ids, expert_weights=one_hot), by_ids, atol=1e-6)
    # a mixture is the weighted sum of the expert updates; on lm_head (the last layer) that is visible in the logits
    head = moa.attach(fresh(llama), MoAConfig(n_experts=3, r=4, router="static", target_modules=["lm_head"]))
    randomize_experts(head)
    base = run(llama, input_ids=ids)
    deltas = [run(head, input_ids=ids, expert_ids=[e] * 3) - base for e in range(3)]
    w = torch.tensor([0.25, 0.0, 0.75])
    mix = run(head, input_ids=ids, expert_weights=w.expand(3, 3))
    assert torch.allclose(mix - base, 0.25 * deltas[0] + 0.75 * deltas[2], atol=1e-5)
    assert max_diff(mix, base) > 1e-2
    # per-sample mixtures: each sample its own
    per_sample = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]])
    out = run(head, input_ids=ids, expert_weights=per_sample)
    assert torch.allclose(out[0], base[0] + deltas[0][0], atol=1e-5)
    assert torch.allclose(out[1], base[1] + 0.5 * (deltas[1][1] + deltas[2][1]), atol=1e-5)
    assert torch.allclose(out[2], base[2], atol=1e-6)


def test_static_router_on_domain_ids(llama):
    by_expert = static_llama(llama)
    by_domain = moa.attach(
        fresh(llama),
        MoAConfig(n_experts=3, r=4, router="static", target_modules=["q_proj", "v_proj", "up_proj"],
                  router_options={"key": "domain_ids"}),
    )
    load_moa_state(by_domain, by_expert.moa_state_dict())  # the same experts
    ids = token_ids(batch=3)
    assert torch.equal(
        run(by_domain, input_ids=ids, domain_ids=[2, 0, 1]), run(by_expert, input_ids=ids, expert_ids=[2, 0, 1])
    )
    with pytest.raises(ValueError, match="domain_ids"):
        run(by_domain, input_ids=ids, expert_ids=[2, 0, 1])


# -- 5. PEFT interop --------------------------------------------------------------------------------------------

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def peft_adapters(llama, tmp_path_factory):
    """Two PEFT LoRA adapters of different ranks on the same base Llama, with random (non-zero) B."""
    root = tmp_path_factory.mktemp("peft")
    dirs = {}
    for name, r, alpha, seed in (("a", 4, 8, 10), ("b", 8, 16, 11)):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
        peft_model = get_peft_model(fresh(llama), config)
        assert all(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
        peft_model.save_pretrained(str(root / name))
        dirs[name] = root / name
    return dirs


def peft_logits(llama, adapter_dir, **kwargs):
    peft_model = PeftModel.from_pretrained(fresh(llama), str(adapter_dir)).eval()
    return run(peft_model, **kwargs)


def test_from_peft_each_expert_equals_its_adapter(llama, peft_adapters):
    moa_model = moa.from_peft(fresh(llama), {"a": peft_adapters["a"], "b": peft_adapters["b"]}).eval()
    assert moa_model.config.expert_names == ["a", "b"]
    assert moa_model.config.router == "static" and moa_model.config.r == 8
    assert len(moa_model.moa_layers()) == 4
    ids = token_ids(batch=2)
    base = run(llama, input_ids=ids)
    for e, name in enumerate(("a", "b")):
        expected = peft_logits(llama, peft_adapters[name], input_ids=ids)
        assert max_diff(expected, base) > 1e-2  # the adapter does something
        got = run(moa_model, input_ids=ids, expert_ids=[e, e])
        assert torch.allclose(got, expected, atol=1e-5), f"expert {e} ({name}): max diff {max_diff(got, expected)}"


def test_from_peft_list_of_folders_names_experts_by_folder(llama, peft_adapters):
    moa_model = moa.from_peft(fresh(llama), [peft_adapters["b"], peft_adapters["a"]])
    assert moa_model.config.expert_names == ["b", "a"]
    ids = token_ids(batch=2)
    assert torch.allclose(
        run(moa_model, input_ids=ids, expert_ids=[0, 0]), peft_logits(llama, peft_adapters["b"], input_ids=ids), atol=1e-5
    )


def test_from_peft_mixed_batch_equals_peft_adapter_names(llama, peft_adapters):
    moa_model = moa.from_peft(fresh(llama), {"a": peft_adapters["a"], "b": peft_adapters["b"]})
    peft_model = PeftModel.from_pretrained(fresh(llama), str(peft_adapters["a"]), adapter_name="a")
    peft_model.load_adapter(str(peft_adapters["b"]), adapter_name="b")
    peft_model.eval()
    ids = token_ids(batch=2)
    expected = run(peft_model, input_ids=ids, adapter_names=["a", "b"])
    got = run(moa_model, input_ids=ids, expert_ids=[0, 1])
    assert torch.allclose(got, expected, atol=1e-5), max_diff(got, expected)
    assert max_diff(expected[0], expected[1]) > 1e-3  # two different samples and adapters
    # PEFT's "__base__" is expert id -1
    expected = run(peft_model, input_ids=ids, adapter_names=["b", "__base__"])
    got = run(moa_model, input_ids=ids, expert_ids=[1, -1])
    assert torch.allclose(got, expected, atol=1e-5), max_diff(got, expected)


def test_from_peft_errors(llama, peft_adapters, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        moa.from_peft(fresh(llama), {"x": tmp_path})
    with pytest.raises(ValueError, match="at least one adapter"):
        moa.from_peft(fresh(llama), {})
    # an adapter saved from a model of another width does not fit
    with pytest.raises(ValueError, match=r"adapter 'a' module .* is 32x32, the model's layer is 48x48"):
        moa.from_peft(tiny_llama(hidden=48), {"a": peft_adapters["a"]})


def save_peft(llama, directory, seed: int = 12, **lora_kwargs):
    """A PEFT LoRA adapter on q_proj / v_proj with random (non-zero) B, saved to ``directory``."""
    torch.manual_seed(seed)
    config = LoraConfig(target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    get_peft_model(fresh(llama), config).save_pretrained(str(directory))
    return directory


def test_from_peft_rslora_scale(llama, tmp_path):
    """rsLoRA scales by alpha / sqrt(r) (here 8 / 2 = 4, where plain LoRA would give 8 / 4 = 2)."""
    plain = save_peft(llama, tmp_path / "plain", r=4, lora_alpha=8)
    rs = save_peft(llama, tmp_path / "rs", r=4, lora_alpha=8, use_rslora=True)  # same seed: the same factors
    assert json.loads((rs / "adapter_config.json").read_text())["use_rslora"] is True
    moa_model = moa.from_peft(fresh(llama), {"rs": rs, "plain": plain})
    ids = token_ids(batch=2)
    expected = peft_logits(llama, rs, input_ids=ids)
    got = run(moa_model, input_ids=ids, expert_ids=[0, 0])
    assert torch.allclose(got, expected, atol=1e-5), max_diff(got, expected)
    assert max_diff(expected, peft_logits(llama, plain, input_ids=ids)) > 1e-2  # the scale matters here
    # the folded scale: expert 0's B is exactly twice expert 1's (alpha / sqrt(r) vs alpha / r)
    for layer in moa_model.moa_layers().values():
        assert torch.allclose(layer.pool.B[0], 2 * layer.pool.B[1])


@pytest.mark.parametrize(
    "kwargs, what",
    [
        ({"use_dora": True}, "DoRA"),
        ({"rank_pattern": {"v_proj": 2}}, r"per-module ranks \(rank_pattern\)"),
        ({"alpha_pattern": {"v_proj": 16}}, r"per-module alphas \(alpha_pattern\)"),
    ],
    ids=["dora", "rank_pattern", "alpha_pattern"],
)
def test_from_peft_refuses_what_plain_lora_experts_cannot_hold(llama, peft_adapters, tmp_path, kwargs, what):
    bad = save_peft(llama, tmp_path / "bad", r=4, lora_alpha=8, **kwargs)
    model = fresh(llama)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = token_ids()
    expected = run(model, input_ids=ids)
    with pytest.raises(ValueError, match=rf"bad: {what}.* cannot be imported as plain LoRA experts"):
        moa.from_peft(model, {"a": peft_adapters["a"], "bad": bad})  # a good adapter first
    assert not any(isinstance(m, MoALinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(run(model, input_ids=ids), expected)
    moa.from_peft(model, [peft_adapters["a"]])  # still usable


def test_to_peft_single_expert(llama, peft_adapters, tmp_path):
    moa_model = moa.from_peft(fresh(llama), {"a": peft_adapters["a"], "b": peft_adapters["b"]})
    out_dir = moa.to_peft(moa_model, tmp_path / "exported", route=1)
    assert (out_dir / "adapter_config.json").is_file() and (out_dir / "adapter_model.safetensors").is_file()
    ids = token_ids(batch=2)
    expected = run(moa_model, input_ids=ids, expert_ids=[1, 1])
    got = peft_logits(llama, out_dir, input_ids=ids)
    assert torch.allclose(got, expected, atol=1e-5), max_diff(got, expected)
    # which is, through the round trip, adapter "b" itself
    assert torch.allclose(got, peft_logits(llama, peft_adapters["b"], input_ids=ids), atol=1e-5)


def test_to_peft_fixed_mixture(llama, peft_adapters, tmp_path):
    moa_model = moa.from_peft(fresh(llama), {"a": peft_adapters["a"], "b": peft_adapters["b"]})
    ids = token_ids(batch=3)
    out_dir = moa.to_peft(moa_model, tmp_path / "mix", route=[0.3, 0.7])
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    assert saved["r"] == 2 * moa_model.config.r  # both experts active: ranks side by side
    expected = run(moa_model, input_ids=ids, expert_weights=[[0.3, 0.7]] * 3)
    got = peft_logits(llama, out_dir, input_ids=ids)
    assert torch.allclose(got, expected, atol=1e-5), max_diff(got, expected)
    # the mixture is neither expert alone
    assert max_diff(got, run(moa_model, input_ids=ids, expert_ids=[0] * 3)) > 1e-3
    assert max_diff(got, run(moa_model, input_ids=ids, expert_ids=[1] * 3)) > 1e-3


def test_to_peft_from_attached_pool_with_scaling(llama, tmp_path):
    """A pool trained in MoA (alpha != r) exports exactly, for one expert and for a mixture with a zero weight."""
    moa_model = static_llama(llama, alpha=12)  # 3 experts, r = 4, scale 3
    ids = token_ids(batch=2)
    single = moa.to_peft(moa_model, tmp_path / "single", route=2)
    assert torch.allclose(
        peft_logits(llama, single, input_ids=ids), run(moa_model, input_ids=ids, expert_ids=[2, 2]), atol=1e-5
    )
    mix = moa.to_peft(moa_model, tmp_path / "mix", route=[0.5, 0.0, 0.5])
    assert json.loads((mix / "adapter_config.json").read_text())["r"] == 8  # only the two active experts
    assert torch.allclose(
        peft_logits(llama, mix, input_ids=ids),
        run(moa_model, input_ids=ids, expert_weights=[[0.5, 0.0, 0.5]] * 2),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="weight 0"):
        moa.to_peft(moa_model, tmp_path / "nothing", route=[0.0, 0.0, 0.0])
    assert not (tmp_path / "nothing").exists()


def test_to_peft_gpt2_conv1d(tmp_path):
    gpt2 = tiny_gpt2()
    moa_model = moa.attach(fresh(gpt2), MoAConfig(n_experts=2, r=4, router="static", target_modules=["c_attn", "c_fc"]))
    randomize_experts(moa_model)
    out_dir = moa.to_peft(moa_model, tmp_path / "gpt2", route=0)
    ids = token_ids(batch=2)
    got = run(PeftModel.from_pretrained(fresh(gpt2), str(out_dir)).eval(), input_ids=ids)
    expected = run(moa_model, input_ids=ids, expert_ids=[0, 0])
    assert max_diff(expected, run(gpt2, input_ids=ids)) > 1e-2
    assert torch.allclose(got, expected, atol=1e-5), max_diff(got, expected)


def test_to_peft_refuses_non_empty_directory(llama, tmp_path):
    moa_model = static_llama(llama)
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        moa.to_peft(moa_model, target, route=0)
    assert (target / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp folder left behind
    moa.to_peft(moa_model, target, route=0, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "adapter_config.json").is_file()
    # an existing empty folder is fine without overwrite
    (tmp_path / "empty").mkdir()
    moa.to_peft(moa_model, tmp_path / "empty", route=1)
    assert (tmp_path / "empty" / "adapter_model.safetensors").is_file()


# -- 6. merge ---------------------------------------------------------------------------------------------------


def check_merged(merged, pristine_type, ids, expected, base_out):
    assert type(merged) is pristine_type
    assert not any(isinstance(m, MoALinear) for m in merged.modules())
    out = run(merged, input_ids=ids)
    assert torch.allclose(out, expected, atol=1e-5), max_diff(out, expected)
    assert max_diff(out, base_out) > 1e-2


@pytest.mark.parametrize("how", ["method", "function"])
@pytest.mark.parametrize("route", [1, [0.2, 0.0, 0.8]])
def test_merge_llama(llama, how, route):
    moa_model = static_llama(llama)  # q_proj, v_proj, up_proj (32 -> 64)
    ids = token_ids(batch=2)
    if isinstance(route, int):
        expected = run(moa_model, input_ids=ids, expert_ids=[route, route])
    else:
        expected = run(moa_model, input_ids=ids, expert_weights=[route, route])
    merged = moa_model.merge(route) if how == "method" else moa.merge(moa_model, route)
    check_merged(merged, LlamaForCausalLM, ids, expected, run(llama, input_ids=ids))
    # the merged model has exactly the base model's parameters (names and shapes)
    assert {n: p.shape for n, p in merged.named_parameters()} == {n: p.shape for n, p in llama.named_parameters()}


@pytest.mark.parametrize("route", [0, [0.6, 0.4]])
def test_merge_gpt2_conv1d(route):
    gpt2 = tiny_gpt2()
    moa_model = moa.attach(
        fresh(gpt2), MoAConfig(n_experts=2, r=4, alpha=8, router="static", target_modules=["c_attn", "c_fc"])
    )
    randomize_experts(moa_model)
    assert all(isinstance(layer.base_layer, Conv1D) for layer in moa_model.moa_layers().values())
    ids = token_ids(batch=2)
    if isinstance(route, int):
        expected = run(moa_model, input_ids=ids, expert_ids=[route, route])
    else:
        expected = run(moa_model, input_ids=ids, expert_weights=[route, route])
    merged = moa.merge(moa_model, route)
    check_merged(merged, GPT2LMHeadModel, ids, expected, run(gpt2, input_ids=ids))
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)


def test_merge_bad_route(llama):
    moa_model = static_llama(llama)
    with pytest.raises(ValueError, match="out of range"):
        moa_model.merge(3)
    with pytest.raises(ValueError, match="one weight per expert"):
        moa_model.merge([0.5, 0.5])
    # a failed merge changed nothing
    assert len(moa_model.moa_layers()) == 6


# -- 7. failures leave the caller's model as it was; routes and generation -------------------------------------


def test_failed_load_and_from_peft_leave_the_base_model_untouched(llama, tmp_path, peft_adapters):
    moa.attach(fresh(llama), MoAConfig(n_experts=2, r=2)).save_pretrained(tmp_path / "saved")
    wrong = tiny_llama(hidden=48)
    flags = {n: p.requires_grad for n, p in wrong.named_parameters()}
    with pytest.raises(ValueError, match="the model expects"):
        moa.load(tmp_path / "saved", wrong)
    assert not any(isinstance(m, moa.MoALinear) for m in wrong.modules())
    assert {n: p.requires_grad for n, p in wrong.named_parameters()} == flags
    with pytest.raises(ValueError, match="the model's layer is"):
        moa.from_peft(wrong, [peft_adapters["a"]])
    assert not any(isinstance(m, moa.MoALinear) for m in wrong.modules())
    moa.attach(wrong, MoAConfig(n_experts=2, r=2))  # still attachable


@pytest.mark.parametrize("failure", ["build", "swap"])
def test_failed_attach_leaves_the_model_untouched(llama, monkeypatch, failure):
    """The last layer fails (while building, or while being swapped in after the others): nothing changes."""
    model = fresh(llama)
    model.model.embed_tokens.weight.requires_grad_(False)  # mixed flags, to be restored as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    ids = token_ids()
    expected = run(model, input_ids=ids)
    targets = ["q_proj", "v_proj", "lm_head"]
    assert moa.model.find_targets(model, targets)[-1] == "lm_head"  # 32 -> 100, the last layer
    if failure == "build":  # 8 heads divide 32, 16 and 64 (q, v) but not lm_head's 100 outputs
        config = MoAConfig(n_experts=2, r=2, router="mhr", target_modules=targets,
                           router_options={"n_tasks": 2, "n_heads": 8})
        match = "n_heads=8 must divide"
    else:
        config, match = MoAConfig(n_experts=2, r=2, target_modules=targets), "injected"
        real = moa.model._set_submodule

        def set_submodule(root, name, module):
            if name == "lm_head" and isinstance(module, MoALinear):
                raise RuntimeError("injected")
            real(root, name, module)

        monkeypatch.setattr(moa.model, "_set_submodule", set_submodule)
    with pytest.raises((ValueError, RuntimeError), match=match):
        moa.attach(model, config)
    monkeypatch.undo()
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[n] is m for n, m in modules.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(run(model, input_ids=ids), expected)
    # a good config attaches, and unloading gives back the flags from before the failed attach
    moa_model = moa.attach(model, MoAConfig(n_experts=2, r=2, router="static", target_modules=targets))
    assert len(moa_model.moa_layers()) == 5
    assert torch.equal(run(moa_model, input_ids=ids, expert_ids=[0, 1]), expected)  # B = 0 at init
    moa_model.unload()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_unload_restores_the_base_model(llama):
    model = fresh(llama)
    moa_model = moa.attach(model, MoAConfig(n_experts=2, r=2))
    randomize_experts(moa_model)
    plain = moa_model.unload()
    assert plain is model and not any(isinstance(m, moa.MoALinear) for m in plain.modules())
    ids = token_ids()
    assert torch.equal(run(plain, input_ids=ids), run(llama, input_ids=ids))
    assert all(p.requires_grad for p in plain.parameters())


def test_single_adapter_with_topk_router_and_integer_like_routes(llama, peft_adapters):
    moa_model = moa.from_peft(fresh(llama), [peft_adapters["a"]], router="topk")
    assert moa_model.config.top_k == 1
    moa_model = static_llama(llama)
    randomize_experts(moa_model)
    ids = token_ids()
    expected = run(moa_model, input_ids=ids, expert_ids=[1, 1])
    merged = moa_model.merge(torch.tensor(1))
    assert max_diff(run(merged, input_ids=ids), expected) < 1e-5


def test_generate_with_beams_repeats_the_routing_context(llama):
    moa_model = static_llama(llama).eval()
    ids = token_ids(batch=2, length=4)
    beams = moa_model.generate(input_ids=ids, expert_ids=[0, 2], num_beams=2, max_new_tokens=3, do_sample=False)
    for i, expert in enumerate((0, 2)):
        alone = moa_model.generate(input_ids=ids[i : i + 1], expert_ids=[expert], num_beams=2, max_new_tokens=3, do_sample=False)
        assert torch.equal(beams[i : i + 1], alone)


# -- parameter counts, as PEFT counts them ------------------------------------------------------------------------


def test_get_nb_trainable_parameters_matches_a_hand_count_and_peft_lora(capsys):
    """A single static expert is one LoRA adapter: same A [r, d_in] and B [d_out, r] per layer, no router
    parameters, so moa and PEFT (same base, same LoRA config) must give the same two numbers and the same line."""
    targets, r = ["query", "value"], 4
    moa_model = moa.attach(tiny_bert(), MoAConfig(n_experts=1, r=r, router="static", target_modules=targets))
    trainable, total = moa_model.get_nb_trainable_parameters()  # was: AttributeError naming 'BertModel'
    named = dict(moa_model.named_parameters())
    assert trainable == sum(p.numel() for p in named.values() if p.requires_grad)
    assert total == sum(p.numel() for p in named.values())
    base_total = sum(p.numel() for p in tiny_bert().parameters())
    adapted = 2 * 2  # query and value in each of the 2 layers, each 32 -> 32
    assert trainable == adapted * r * (32 + 32) and total == base_total + trainable
    assert moa_model.count_parameters() == (trainable, total)

    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=r, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    assert peft_model.get_nb_trainable_parameters() == (trainable, total)
    peft_model.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    assert moa_model.print_trainable_parameters() == peft_line == capsys.readouterr().out.strip()


def test_get_nb_trainable_parameters_counts_4bit_and_zero3_params_like_peft(llama):
    """bitsandbytes 4-bit weights hold two values per byte of storage; DeepSpeed ZeRO-3 leaves partitioned
    parameters empty with their size in ``ds_numel``. Both counts follow PEFT's rule, checked by running PEFT's
    own counting function on the same wrapper."""

    class Params4bit(torch.nn.Parameter):  # the class name is what PEFT (and moa) look at
        pass

    moa_model = moa.attach(fresh(llama), MoAConfig(n_experts=2, r=2, target_modules=["q_proj"]))
    before_trainable, before_total = moa_model.get_nb_trainable_parameters()
    head = moa_model.model.lm_head
    head.register_parameter("packed", Params4bit(torch.zeros(6, 5, dtype=torch.int16), requires_grad=False))
    sharded = torch.nn.Parameter(torch.empty(0))
    sharded.ds_numel = 77
    head.register_parameter("sharded", sharded)
    counts = moa_model.get_nb_trainable_parameters()
    assert counts == (before_trainable + 77, before_total + 30 * 2 * 2 + 77)  # int16: 2 bytes, 2 values each
    assert counts == PeftModel.get_nb_trainable_parameters(moa_model)
