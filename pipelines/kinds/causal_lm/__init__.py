"""The causal-LM kind: a decoder with MoA pools, trained on target tokens, served by generation."""

from moa.pipelines.bundle import ModelKind, register_kind
from moa.pipelines.kinds import text_bundle
from moa.pipelines.kinds.causal_lm import service

KIND = register_kind(ModelKind(
    name=text_bundle.CAUSAL_LM,
    service=service.GenerationService,
    gate=("val/loss", "min"),
    signature=service.signature,
    input_example=service.input_example,
    modules=("moa.pipelines.kinds.causal_lm.module.MoACausalLM",
             "moa.pipelines.kinds.causal_lm.module.RLOOCausalLM"),
))
