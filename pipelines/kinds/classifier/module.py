"""Config-friendly LightningModules for the CLI: every argument is a plain value a YAML file can hold.

:class:`MoAClassifier` builds its backbone (a tiny BERT from a config, or a pretrained model: ``"minilm"``,
``"smollm2-135m"``, a ``.gguf`` file or a local model folder), attaches a MoA pool with the given router, and trains it with a classification head through
:class:`moa.lightning.MoAModule` (separate learning rates for experts and routers, auxiliary router losses);
:class:`RLOOClassifier` is the same with RLOO training for sampling routers (ReMix).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import moa
from moa.experts.errors import UserError
from moa.lightning import ClassificationHead, MoAModule
from moa.metrics import calibration_metrics
from moa.pretrained import resolve_pretrained
from moa.pipelines.kinds.text_bundle import metric_name, write_text_bundle_of
from moa.rloo import RLOOModule

TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)


def build_backbone(name: str = "tiny-bert", options: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """A transformers model without its head: ``"tiny-bert"`` (random, ``options`` override its ``BertConfig``), or
    a pretrained one (:func:`moa.pretrained.resolve_pretrained`): ``"minilm"`` (the installed all-MiniLM-L6-v2),
    ``"smollm2-135m"``, a ``.gguf`` file or a local folder saved with ``save_pretrained`` (``options``:
    ``from_pretrained`` keyword arguments)."""
    from transformers import AutoModel, BertConfig, BertModel

    options = dict(options or {})
    if name == "tiny-bert":
        torch.manual_seed(seed)
        return BertModel(BertConfig(**{**TINY_BERT, **options}))
    return AutoModel.from_pretrained(str(resolve_pretrained(name, presets=["tiny-bert"])), **options)


class TaskLabelHead(nn.Module):
    """One label space per task: a linear head per task (stacked as one ``Linear``) on the pooled hidden states.

    ``forward(hidden, attention_mask, task_ids)`` returns ``[B, max labels]`` logits; the positions past a row's
    task's own labels hold the dtype's lowest value (probability 0), so cross-entropy, softmax and argmax see
    each row's own label set only.
    """

    def __init__(self, hidden_size: int, label_counts: list[int], pooling: str = "mean"):
        super().__init__()
        if not label_counts or min(label_counts) < 1:
            raise UserError(f"every task needs at least one label, got label counts {label_counts}")
        self.label_counts = list(label_counts)
        self.scores = ClassificationHead(hidden_size, sum(label_counts), pooling)
        width = max(label_counts)
        offsets = torch.tensor([0, *label_counts[:-1]]).cumsum(0)
        columns = torch.arange(width)
        valid = columns < torch.tensor(label_counts)[:, None]
        self.register_buffer("index", (offsets[:, None] + columns).where(valid, 0), persistent=False)
        self.register_buffer("valid", valid, persistent=False)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None, task_ids: Tensor) -> Tensor:
        if task_ids.min() < 0 or task_ids.max() >= len(self.label_counts):
            raise UserError(f"task_ids must lie in [0, {len(self.label_counts) - 1}] (the head's tasks), got "
                             f"values in [{int(task_ids.min())}, {int(task_ids.max())}]")
        scores = self.scores(hidden, attention_mask)
        logits = scores.gather(1, self.index[task_ids])
        return logits.masked_fill(~self.valid[task_ids], torch.finfo(logits.dtype).min)


def macro_f1(pred: Tensor, target: Tensor) -> float:
    """Macro-averaged F1 over the labels that occur in ``target`` or ``pred`` (scikit-learn's convention)."""
    scores = []
    for label in torch.unique(torch.cat([pred, target])).tolist():
        tp = ((pred == label) & (target == label)).sum().item()
        predicted, actual = (pred == label).sum().item(), (target == label).sum().item()
        scores.append(2 * tp / (predicted + actual))
    return sum(scores) / len(scores) if scores else 0.0


def gather_rows(module, rows: Tensor) -> Tensor:
    """Under DDP: every rank's ``rows`` (each rank its own number of them) concatenated in rank order, on every
    rank. Every rank must call it."""
    sizes = module.all_gather(torch.tensor(len(rows), device=rows.device)).flatten().tolist()
    if max(sizes) == 0:
        return rows
    padded = torch.cat([rows, rows.new_zeros(max(sizes) - len(rows), *rows.shape[1:])])
    gathered = module.all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)])


class MoAClassifier(MoAModule):
    """Sequence classification with a MoA-adapted encoder.

    Args:
        backbone: ``"tiny-bert"``, ``"minilm"``, ``"smollm2-135m"``, a ``.gguf`` file or a local model folder (see
            :func:`build_backbone`); recorded as given, so a bundle can reference it by name.
        backbone_options: overrides of the tiny BERT's config, or ``from_pretrained`` keyword arguments.
        n_classes: classes of one head shared by all tasks; ``None`` (the default): one label set per task, read
            from the data module's ``label_names`` (:class:`moa.pipelines.data.text.TextData`); checkpoints keep
            the names, so ``load_from_checkpoint`` rebuilds the head without data.
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
        n_classes: int | None = None,
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
        head = ClassificationHead(base.config.hidden_size, n_classes, pooling) if n_classes else None
        super().__init__(model, head=head, lr=lr, router_lr=router_lr, group_lrs=group_lrs,
                         weight_decay=weight_decay, aux_loss_weight=aux_loss_weight, **self._module_options())
        self.backbone, self.vocab_size = backbone, base.config.vocab_size
        self.hidden_size, self.pooling, self.seed = base.config.hidden_size, pooling, seed
        self.names: dict[str, Any] | None = None  # {"tasks", "domains", "labels"} of the data it was trained on
        self._outcomes: dict[str, list[Tensor]] = {}  # stage -> [rows, 3 + classes]: task, label, loss, probs

    def _module_options(self) -> dict[str, Any]:
        return {}

    write_bundle = write_text_bundle_of
    bundle_kind = "classifier"  # the kind its bundles name (moa.pipelines.kinds.classifier registers it)
    random_backbones = ("tiny-bert",)  # built from a random config: a bundle must include its weights

    def text_bundle_meta(self, tasks: list[str], domains: list[str]) -> dict[str, Any]:
        """This kind's part of the bundle's service.json: names, labels, the head's shape
        (:mod:`moa.pipelines.kinds.text_bundle`)."""
        head = self.head
        if isinstance(head, TaskLabelHead):
            names = self.names or {}
            tasks, domains = list(names.get("tasks", tasks)), list(names.get("domains", domains))
            labels = {task: list(map(str, names["labels"][task])) for task in tasks}
            spec = {"type": "task_labels", "label_counts": head.label_counts}
        elif head is not None:
            n = head.classifier.out_features
            labels = {task: [str(i) for i in range(n)] for task in tasks}
            spec = {"type": "shared", "n_classes": n}
        else:
            raise UserError("the classifier has no head yet: fit it (or build it with its data) before bundling")
        spec["pooling"], spec["hidden_size"] = self.pooling, self.hidden_size
        return {"kind": self.bundle_kind, "tasks": tasks, "domains": domains, "labels": labels, "head": spec}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if callable(getattr(datamodule, "use_backbone", None)):  # the backbone's tokenizer, or a check of the named
            datamodule.use_backbone(self.backbone)
        needed = getattr(datamodule, "vocab_size", None)
        if needed is not None and needed > self.vocab_size:
            raise UserError(
                f"the data uses token ids up to {needed - 1} but the backbone's vocabulary has {self.vocab_size} "
                f"tokens: set model.init_args.backbone_options.vocab_size >= {needed}"
            )

    def configure_model(self) -> None:
        """Without ``n_classes``, build one label set per task from the data module's names. Without a trainer
        (``load_from_checkpoint``) the checkpoint's saved names build it instead (:meth:`on_load_checkpoint`); a
        per-task head built before must match the names of the data it is given."""
        datamodule = getattr(self._trainer, "datamodule", None)
        labels = getattr(datamodule, "label_names", None)
        if self.head is not None:
            if self.names is not None and labels:
                self._check_names(self.names, datamodule.vocab())
            return
        if self._trainer is None:
            return
        if not labels:
            raise UserError("set model.init_args.n_classes, or use a data module with named labels per task "
                             "(moa.pipelines.data.text.TextData with target: label)")
        self._build_task_head(datamodule.vocab())

    def _build_task_head(self, names: dict[str, Any]) -> None:
        try:
            counts = [len(names["labels"][task]) for task in names["tasks"]]
        except (KeyError, TypeError) as error:
            raise UserError(f"task and label names need 'tasks' and 'labels' per task, got {names!r}") from error
        self.names = names
        torch.manual_seed(self.seed)
        self.head = TaskLabelHead(self.hidden_size, counts, self.pooling)
        self.head.to(next(self.model.parameters()).device)

    @staticmethod
    def _check_names(trained: dict[str, Any], data: dict[str, Any]) -> None:
        if trained != data:
            raise UserError(f"the model was trained on tasks and labels {trained}; the data has {data}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.names is not None:
            checkpoint["moa_names"] = self.names

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A per-task head not built yet (no trainer) is rebuilt from the checkpoint's names; one built from the
        data must have been trained on the same names."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("moa_names")
        if self.head is None:
            if saved is None:
                raise UserError("the checkpoint has no task and label names to rebuild its per-task head: load it "
                                 "with n_classes, or within a trainer given its data")
            self._build_task_head(saved)
        elif saved is not None and self.names is not None:
            self._check_names(saved, self.names)

    def apply_head(self, outputs, batch: dict) -> Tensor:
        if not isinstance(self.head, TaskLabelHead):
            return super().apply_head(outputs, batch)
        return self.head(outputs.last_hidden_state, batch.get("attention_mask"), batch["task_ids"])

    def _loss(self, batch: dict):
        loss, logits = super()._loss(batch)
        if self.training:  # per-step values are logged by MoAModule; this adds the epoch mean
            self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=batch["labels"].shape[0],
                     sync_dist=True)
        return loss, logits

    def _eval_step(self, batch: dict, stage: str) -> Tensor:
        """Keeps each row's task, label, loss and class probabilities; the epoch's metrics are computed at its end
        from the rows of every rank (:meth:`_log_epoch`)."""
        loss, logits = self._loss(batch)
        labels = batch["labels"]
        tasks = batch.get("task_ids")
        tasks = torch.zeros_like(labels) if tasks is None else tasks
        # the batch's mean loss on each of its rows: the epoch's row mean weighs batches by their rows
        rows = torch.cat([tasks[:, None].float(), labels[:, None].float(), loss.detach().float().expand(len(labels), 1),
                          logits.detach().float().softmax(-1)], 1)
        self._outcomes.setdefault(stage, []).append(rows)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._outcomes.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._outcomes.pop("test", None)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_epoch("test")

    def _head_width(self) -> int:
        if isinstance(self.head, TaskLabelHead):
            return max(self.head.label_counts)
        return self.head.classifier.out_features

    def _log_epoch(self, stage: str) -> None:
        """``<stage>/loss``, ``<stage>/accuracy`` and the calibration metrics; with task names
        ``<stage>/<task>/accuracy``, ``<stage>/<task>/macro_f1`` and ``<stage>/macro_f1`` (their mean). Under DDP
        each rank's rows (their numbers may differ) are gathered first, so every rank logs the global values."""
        parts = self._outcomes.pop(stage, [])
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if not parts and not distributed:
            return
        rows = torch.cat(parts) if parts else torch.zeros(0, 3 + self._head_width(), device=self.device)
        if distributed:  # every rank takes part, also one without rows
            rows = gather_rows(self, rows)
        if not len(rows):
            return
        rows = rows.cpu()
        tasks, labels, losses, probs = rows[:, 0].long(), rows[:, 1].long(), rows[:, 2].double(), rows[:, 3:]
        preds = probs.argmax(-1)
        log = self._log_global
        log(f"{stage}/loss", float(losses.mean()), prog_bar=True)
        log(f"{stage}/accuracy", float((preds == labels).double().mean()))
        calibration = calibration_metrics(probs, labels)
        for name in ("ece", "mce", "ace", "classwise_ece", "brier"):
            log(f"{stage}/{name}", calibration[name])
        if self.names is None:
            return
        f1s = []
        for index, task in enumerate(self.names["tasks"]):
            mine = tasks == index
            if mine.any():
                f1s.append(macro_f1(preds[mine], labels[mine]))
                log(f"{stage}/{metric_name(task)}/accuracy", float((preds[mine] == labels[mine]).double().mean()))
                log(f"{stage}/{metric_name(task)}/macro_f1", f1s[-1])
        log(f"{stage}/macro_f1", sum(f1s) / len(f1s))

    def _log_global(self, name: str, value: float, **kwargs: Any) -> None:
        """Log a value every rank computed from all ranks' rows: the max over ranks leaves it exact (a mean could
        move it by rounding) and tells Lightning it is synced."""
        self.log(name, value, sync_dist=True, reduce_fx="max", **kwargs)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        probs = self(batch).float().softmax(-1)
        probability, prediction = probs.max(-1)
        out: dict[str, Any] = {"prediction": prediction, "probability": probability}
        if self.names is not None:
            tasks = [self.names["tasks"][t] for t in batch["task_ids"].tolist()]
            out = {"row": batch["row"], "task": tasks,
                   "label": [self.names["labels"][t][p] for t, p in zip(tasks, prediction.tolist())], **out}
        return out


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
