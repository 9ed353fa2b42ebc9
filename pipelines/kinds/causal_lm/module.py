"""Causal LMs with MoA adapters for the CLI: train on target tokens, route per example, evaluate by generation.

:class:`MoACausalLM` hosts a pretrained causal LM (``"smollm2-135m"``, any ``.gguf`` file or local
``AutoModelForCausalLM`` folder: :func:`moa.pretrained.resolve_pretrained`) or a tiny preset built from a config
(``"tiny-llama"``, ``"tiny-gpt2"``; MiniLM's 30522-token vocabulary, ``[SEP]`` as eos), attaches a MoA pool, and
trains it with the loss on the target tokens only. Validation reports token-weighted loss and perplexity per
task; ``moa validate|test`` (and fit every N epochs on request) also generate greedily per task and report exact
match and ROUGE-L; ``moa predict`` returns the generations as strings.

Batches follow the text data contract: ``input_ids``/``attention_mask`` (prompt + target + eos, right-padded),
``labels`` (-100 on prompt and padding), ``task_ids``, ``domain_ids``, ``row``, ``prompt_input_ids``/
``prompt_attention_mask`` (left-padded prompts) and ``target_text``.

    python -m moa.pipelines.kinds.causal_lm.module --save-preset tiny-llama out/tiny-llama   # a folder from_pretrained reads
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa.experts.errors import UserError
import moa
from moa.lightning import MoAModule
from moa.rloo import RLOOModule
from moa.routers import CONTEXT_KEYS

from moa.pipelines.data.text import decode_generation, load_tokenizer, tokenizer_source
from moa.pretrained import minilm_dir, resolve_pretrained
from moa.pipelines.kinds.text_bundle import metric_name, write_text_bundle_of

MINILM_VOCAB = 30522
MINILM_SPECIAL = dict(pad_token_id=0, bos_token_id=101, eos_token_id=102)  # [PAD], [CLS], [SEP] (eos of the data)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.2),
    "tiny-gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, initializer_range=0.2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0),  # no dropout, like Llama
}
MODEL_KEYS = ("input_ids", "attention_mask", *CONTEXT_KEYS)  # what the model's forward gets from a batch
DEFAULT_MAX_NEW_TOKENS = 32


def preset_config(name: str, **overrides: Any):
    """The transformers config of a preset; ``overrides`` replace its fields."""
    from transformers import GPT2Config, LlamaConfig

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    config_class = LlamaConfig if name == "tiny-llama" else GPT2Config
    return config_class(**{"vocab_size": MINILM_VOCAB, **MINILM_SPECIAL, **PRESETS[name], **overrides})


def build_causal_lm(name: str = "tiny-llama", options: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """A causal LM: a preset (random, seeded; ``options`` override its config) or a pretrained one: a name
    (``"smollm2-135m"``), a ``.gguf`` file or a local model folder (``options`` are ``from_pretrained`` keyword
    arguments)."""
    from transformers import AutoModelForCausalLM

    options = dict(options or {})
    if name in PRESETS:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(preset_config(name, **options))
    return AutoModelForCausalLM.from_pretrained(str(resolve_pretrained(name, presets=sorted(PRESETS))), **options)


def stop_ids(*ids: int | Sequence[int] | None) -> int | list[int] | None:
    """The eos ids of generation, in order and once each: one id as an int, several as a list."""
    out = list(dict.fromkeys(i for group in ids if group is not None
                             for i in ([group] if isinstance(group, int) else group)))
    return out[0] if len(out) == 1 else (out or None)


def save_preset(name: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Build preset ``name`` and save it with MiniLM's tokenizer to ``folder`` (``from_pretrained`` reads it)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    model = build_causal_lm(name, overrides, seed)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return folder


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one pair (torchmetrics: lowercased, non-alphanumerics dropped, whitespace tokens)."""
    from torchmetrics.functional.text.rouge import rouge_score

    return float(rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"])


class MoACausalLM(MoAModule):
    """A causal LM with MoA adapters, trained on target tokens and evaluated by greedy generation per task.

    Args:
        backbone: ``"tiny-llama"``, ``"tiny-gpt2"`` (random presets with MiniLM's vocabulary), a pretrained
            name (``"smollm2-135m"``), a ``.gguf`` file or a local ``AutoModelForCausalLM`` folder (e.g. one written
            by :func:`save_preset`); recorded as given, so a bundle can reference it by name.
        backbone_options: overrides of the preset's config, or ``from_pretrained`` keyword arguments.
        n_experts, r, alpha, router, top_k, target_modules, dropout, router_options, impl, expert_kind,
            expert_options: the :class:`moa.MoAConfig` of the adapters (``target_modules=None``: PEFT's defaults
            for the model type, e.g. ``q_proj, v_proj`` for Llama, ``c_attn`` for GPT-2).
        lr, router_lr, group_lrs, weight_decay, aux_loss_weight: optimisation (see :class:`moa.lightning.MoAModule`).
        max_new_tokens: the generation budget (``None``: the data module's ``target_max_length``, else 32).
        generate_every_n_epochs: during fit, also generate in validation every N epochs (0: only the loss and
            perplexity during fit; ``moa validate`` and ``moa test`` always generate).
        seed: the seed of the random backbone and the new parameters.
    """

    def __init__(
        self,
        backbone: str = "tiny-llama",
        backbone_options: dict[str, Any] | None = None,
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
        max_new_tokens: int | None = None,
        generate_every_n_epochs: int = 0,
        seed: int = 0,
    ):
        config = moa.MoAConfig(
            n_experts=n_experts, r=r, alpha=alpha, router=router, top_k=top_k, target_modules=target_modules,
            dropout=dropout, router_options=dict(router_options or {}), impl=impl, expert_kind=expert_kind,
            expert_options=dict(expert_options or {}),
        )
        base = build_causal_lm(backbone, backbone_options, seed)
        torch.manual_seed(seed)
        model = moa.attach(base, config)
        super().__init__(model, lr=lr, router_lr=router_lr, group_lrs=group_lrs, weight_decay=weight_decay,
                         aux_loss_weight=aux_loss_weight, **self._module_options())
        if generate_every_n_epochs < 0:
            raise UserError(f"generate_every_n_epochs must be >= 0, got {generate_every_n_epochs}")
        self.backbone = backbone
        self.vocab_size = base.config.vocab_size
        self.max_new_tokens, self.generate_every_n_epochs = max_new_tokens, generate_every_n_epochs
        self._budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS  # resolved against the data module in setup
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.tokenizer = None  # the data module's, from setup (else the backbone's: MiniLM's for a preset)
        self.task_names: list[str] = []
        self._model_eos = getattr(base.generation_config, "eos_token_id", None)  # one id or several
        self.eos_token_id = self._model_eos
        self.pad_token_id = getattr(base.generation_config, "pad_token_id", None)
        self._sums: dict[str, dict[str, Tensor]] = {}  # stage -> per-task sums of the epoch

    write_bundle = write_text_bundle_of
    bundle_kind = "causal-lm"  # the kind its bundles name (moa.pipelines.kinds.causal_lm registers it)
    random_backbones = tuple(PRESETS)  # built from a random config: a bundle must include their weights

    def text_bundle_meta(self, tasks: list[str], domains: list[str]) -> dict[str, Any]:
        """This kind's part of the bundle's service.json (:mod:`moa.pipelines.kinds.text_bundle`)."""
        return {"kind": self.bundle_kind, "tasks": list(self.task_names or tasks), "domains": list(domains),
                "max_new_tokens": int(self._budget), "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}

    def default_tokenizer(self):
        """The tokenizer a bundle ships when no data module gives one."""
        return self._tokenizer()

    # -- data --------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if callable(getattr(datamodule, "use_backbone", None)):  # the backbone's tokenizer, or a check of the named
            datamodule.use_backbone(self.backbone)
        needed = getattr(datamodule, "vocab_size", None)
        if needed is not None and needed > self.vocab_size:
            raise UserError(f"the data uses token ids up to {needed - 1} but the backbone's vocabulary has "
                             f"{self.vocab_size} tokens")
        self.tokenizer = getattr(datamodule, "tokenizer", None) or self.tokenizer
        self.task_names = list(getattr(datamodule, "task_names", None) or self.task_names)
        self._budget = self.max_new_tokens or getattr(datamodule, "target_max_length", None) or DEFAULT_MAX_NEW_TOKENS
        if getattr(datamodule, "pad_token_id", None) is not None:
            self.pad_token_id = datamodule.pad_token_id
        eos = getattr(datamodule, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.sep_token_id
        if eos is not None:  # generation stops at the data's eos (trained) and at the model's own
            self.eos_token_id = stop_ids(eos, self._model_eos)

    def _tokenizer(self):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(tokenizer_source(self.backbone))
        return self.tokenizer

    def _task_name(self, task: int) -> str:
        return self.task_names[task] if 0 <= task < len(self.task_names) else f"task_{task}"

    # -- loss --------------------------------------------------------------------------------------------------
    def forward(self, batch: dict, **kwargs: Any):
        return self.model(**{key: batch[key] for key in MODEL_KEYS if batch.get(key) is not None}, **kwargs)

    def token_losses(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Per example: the summed cross-entropy of its target tokens and their number (``labels`` != -100,
        each predicted from the tokens before it)."""
        labels = batch["labels"]
        targets = labels != -100
        # logits only from the position before the batch's first target token on: prompts are most of a row,
        # and [B, T, vocab] logits most of the memory and time
        first = int(targets.int().argmax(1)[targets.any(1)].min()) if bool(targets.any()) else 1
        keep = labels.shape[1] - max(first, 1) + 1
        extra = {"logits_to_keep": keep} if self._logits_to_keep else {}
        logits = self(batch, **extra).logits[:, -keep:-1].float()
        labels = labels[:, labels.shape[1] - keep + 1:]
        losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return losses.sum(1), (labels != -100).sum(1)

    def _loss(self, batch: dict) -> tuple[Tensor, None]:
        sums, counts = self.token_losses(batch)
        loss = sums.sum() / counts.sum().clamp_min(1)
        if self.training and self._trainer is not None:  # per step by MoAModule; this adds the epoch mean
            self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=len(sums))
        return loss, None

    # -- evaluation --------------------------------------------------------------------------------------------
    def _generating(self) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        if self.trainer.sanity_checking:
            return False
        if self.trainer.state.fn != TrainerFn.FITTING:
            return True
        n = self.generate_every_n_epochs
        return n > 0 and (self.current_epoch + 1) % n == 0

    def _add(self, stage: str, name: str, tasks: Tensor, values: Tensor) -> None:
        n = max(len(self.task_names), int(tasks.max()) + 1 if tasks.numel() else 0)
        sums = self._sums.setdefault(stage, {})
        current = sums.get(name)
        if current is None or current.numel() < n:
            grown = torch.zeros(n, dtype=torch.float64, device=values.device)
            if current is not None:
                grown[: current.numel()] = current
            current = grown
        sums[name] = current.index_add(0, tasks.to(values.device), values.detach().to(torch.float64))

    def _eval_step(self, batch: dict, stage: str) -> Tensor:
        sums, counts = self.token_losses(batch)
        tasks = batch["task_ids"]
        self._add(stage, "loss", tasks, sums)
        self._add(stage, "tokens", tasks, counts)
        if batch.get("target_text") is not None and self._generating():
            generations = self.generate_texts(batch)
            tokenizer = self._tokenizer()
            exact, rouge = [], []
            for generation, target in zip(generations, batch["target_text"]):
                # the reference as the tokenizer round-trips it (an uncased tokenizer's lowercasing is no miss)
                reference = tokenizer.decode(tokenizer(target, add_special_tokens=False)["input_ids"]).strip()
                exact.append(float(generation == reference))
                rouge.append(rouge_l(generation, reference))
            self._add(stage, "exact_match", tasks, torch.tensor(exact, device=sums.device))
            self._add(stage, "rougeL", tasks, torch.tensor(rouge, device=sums.device))
            self._add(stage, "examples", tasks, torch.ones(len(exact), device=sums.device))
        return sums.sum() / counts.sum().clamp_min(1)

    def on_validation_epoch_start(self) -> None:
        self._sums.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._sums.pop("test", None)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        """Token-weighted loss and perplexity, and the generation metrics, overall and per task."""
        sums = self._sums.pop(stage, None)
        if not sums:
            return
        n = max(len(self.task_names), max(v.numel() for v in sums.values()))
        sums = {k: F.pad(v, (0, n - v.numel())) for k, v in sums.items()}
        if self.trainer.world_size > 1:
            sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
        metrics: dict[str, float] = {}

        def add(prefix: str, index) -> None:
            tokens = float(sums["tokens"][index].sum())
            if tokens > 0:
                loss = float(sums["loss"][index].sum()) / tokens
                metrics[f"{prefix}/loss"], metrics[f"{prefix}/perplexity"] = loss, math.exp(min(loss, 700.0))
            if "examples" in sums and float(sums["examples"][index].sum()) > 0:
                examples = float(sums["examples"][index].sum())
                for name in ("exact_match", "rougeL"):
                    metrics[f"{prefix}/{name}"] = float(sums[name][index].sum()) / examples

        add(stage, slice(None))
        for task in range(n):
            add(f"{stage}/{metric_name(self._task_name(task))}", slice(task, task + 1))
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == f"{stage}/loss", sync_dist=False)

    # -- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_texts(self, batch: dict, **generate_kwargs: Any) -> list[str]:
        """Greedy generation from the left-padded prompts, routed like the batch; cut at eos, decoded, stripped."""
        prompts = batch["prompt_input_ids"]
        context = {key: batch[key] for key in CONTEXT_KEYS if batch.get(key) is not None}
        options = dict(do_sample=False, num_beams=1, max_new_tokens=self._budget,
                       eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        options.update(generate_kwargs)
        out = self.model.generate(input_ids=prompts, attention_mask=batch["prompt_attention_mask"], **context,
                                  **options)
        tokenizer = self._tokenizer()  # the serving flavour decodes the same way (TextEncoder.decode)
        return [decode_generation(tokenizer, ids, self.eos_token_id) for ids in out[:, prompts.shape[1]:].tolist()]

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        tokenizer = self._tokenizer()
        prompts = [tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True).strip()
                   for ids, mask in zip(batch["prompt_input_ids"].tolist(), batch["prompt_attention_mask"].tolist())]
        out = {
            "row": batch["row"],
            "task": [self._task_name(int(t)) for t in batch["task_ids"]],
            "prompt": prompts,
            "generation": self.generate_texts(batch),
        }
        if batch.get("target_text") is not None:
            out["target"] = list(batch["target_text"])
        return out

    def _module_options(self) -> dict[str, Any]:
        return {}


class RLOOCausalLM(MoACausalLM, RLOOModule):
    """:class:`MoACausalLM` trained with RLOO (:class:`moa.rloo.RLOOModule`), for sampling routers (``remix``);
    each draw's reward is minus the example's mean target-token loss.

    Args:
        n_samples: routing draws per example (M >= 2).
        **kwargs: as for :class:`MoACausalLM`.
    """

    def __init__(self, n_samples: int = 4, **kwargs):
        self._n_samples = n_samples
        super().__init__(**kwargs)

    def _module_options(self) -> dict[str, Any]:
        return {"n_samples": self._n_samples}

    def example_losses(self, batch: dict) -> Tensor:
        sums, counts = self.token_losses(batch)
        return sums / counts.clamp_min(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa.pipelines.kinds.causal_lm.module", description=__doc__.split("\n")[0])
    parser.add_argument("--save-preset", nargs=2, metavar=("NAME", "FOLDER"), required=True,
                        help=f"save preset NAME ({', '.join(sorted(PRESETS))}) with MiniLM's tokenizer to FOLDER")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    name, folder = args.save_preset
    print(save_preset(name, folder, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
