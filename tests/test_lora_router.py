"""Router ``lora``: one plain LoRA adapter, the baseline the routers are compared with. Against a real
``peft.get_peft_model`` on the targets and rank of the shipped configs: the same trainable parameter count, and
the same outputs once PEFT's A and B are copied in; no gate, no auxiliary loss, no routing statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

import moa

ROOT = Path(__file__).resolve().parents[1]


def adapter_args(config: str) -> dict:
    """The MoA arguments of a shipped config (model.init_args)."""
    return yaml.safe_load((ROOT / "configs" / config).read_text())["model"]["init_args"]


def minilm():
    from transformers import AutoModel

    from moa.pretrained import minilm_dir

    return AutoModel.from_pretrained(str(minilm_dir()))


def tiny_llama():
    from moa.pipelines.kinds.causal_lm.module import build_causal_lm

    return build_causal_lm("tiny-llama", seed=0)


def moa_and_peft(build, config: str):
    args = adapter_args(config)
    assert args["router"] == "lora" and args["n_experts"] == 1
    targets, r = args["target_modules"], args["r"]
    alpha = args.get("alpha") or r  # MoA's default alpha is r, as the config leaves it
    ours = moa.attach(build(), moa.MoAConfig(router="lora", n_experts=1, r=r, alpha=alpha, target_modules=targets))
    theirs = get_peft_model(build(), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    return ours, theirs


def copy_peft_weights(ours, theirs) -> int:
    """PEFT's A and B (B made non-zero first) into the one expert of each MoA layer; the number of layers."""
    layers = ours.moa_layers()
    torch.manual_seed(1)
    for name, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            peft_layer.lora_B["default"].weight.normal_(0, 0.05)
            layer.pool.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.pool.lora_B.copy_(peft_layer.lora_B["default"].weight)
    return len(layers)


@pytest.mark.parametrize("build, config", [(minilm, "text-lora.yaml"), (tiny_llama, "causal-lora.yaml")],
                         ids=["minilm", "tiny-llama"])
def test_lora_router_is_peft_lora(build, config):
    ours, theirs = moa_and_peft(build, config)
    # the numbers on MiniLM: PEFT 24,576; top-k with one expert 26,112 (its gate)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert copy_peft_weights(ours, theirs) == len([n for n, _ in theirs.named_modules() if n.endswith(".lora_A")])
    ids = torch.randint(5, 1000, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    for mode in ("eval", "train"):  # train: the base model's dropout on both sides, drawn from the same seed
        ours.train(mode == "train"), theirs.train(mode == "train")
        torch.manual_seed(2)
        out = ours(input_ids=ids, attention_mask=mask)
        torch.manual_seed(2)
        expected = theirs(input_ids=ids, attention_mask=mask)
        key = "last_hidden_state" if hasattr(expected, "last_hidden_state") else "logits"
        torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-5)
        with theirs.disable_adapter():  # the adapters do change the output
            assert not torch.allclose(theirs(input_ids=ids, attention_mask=mask)[key], expected[key], atol=1e-4)
    # no gate, no auxiliary loss, no routing statistics
    assert ours.aux_losses() == {} and ours.routing_stats() == {}
    assert all(not list(layer.router.parameters()) for layer in ours.moa_layers().values())
    assert set(ours.param_groups()) == {"experts"}


def test_lora_router_takes_one_expert():
    with pytest.raises(ValueError, match=r"router 'lora' takes n_experts=1.*got n_experts=4"):
        moa.MoAConfig(router="lora", n_experts=4)
    assert moa.MoAConfig(router="lora", n_experts=1, top_k=1).top_k == 1
