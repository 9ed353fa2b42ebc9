"""``MoAModule``: a LightningModule hosting a model with MoA layers.

The module says what (loss, auxiliary router losses, optimizer groups); the Trainer says how (devices,
precision, strategy, checkpointing). Batches are dicts of the model's keyword arguments, routing context
included (``task_ids``, ``domain_ids``, ``expert_ids``), plus ``labels``.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import calibration_metrics
from .model import SAVED_PREFIX, SHARED_PREFIX, MoAModel
from .training_hooks import OptimizerFollower, follow_optimizer
from moa.experts.errors import UserError, UserTypeError


class ClassificationHead(nn.Module):
    """Pool the last hidden states (first token or masked mean) and classify."""

    def __init__(self, hidden_size: int, n_classes: int, pooling: str = "first"):
        super().__init__()
        if pooling not in ("first", "mean"):
            raise UserError(f"pooling must be 'first' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.classifier = nn.Linear(hidden_size, n_classes)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if self.pooling == "first":
            pooled = hidden[:, 0]
        else:
            mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
            mask = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.classifier(pooled)


class MoAModule(L.LightningModule):
    """Train a :class:`MoAModel`.

    Args:
        model: the model with MoA layers.
        head: optional trainable head on the last hidden states (e.g. :class:`ClassificationHead`); then the loss
            is ``loss_fn(head(hidden), batch["labels"])``. Without a head the model's own ``outputs.loss`` is used
            (transformers computes it when ``labels`` are in the batch).
        loss_fn: loss on the head's output (default cross-entropy).
        lr: learning rate of the experts (and the head).
        router_lr: learning rate of the routers (``None``: same as ``lr``); routers train in their own group.
        group_lrs: learning rates of any further groups routers declare (e.g. ``{"routing_logits": 0.1}``).
        weight_decay: AdamW weight decay of the experts.
        aux_loss_weight: multiplier on the routers' auxiliary losses (which carry their own coefficients).
    """

    def __init__(
        self,
        model: MoAModel,
        head: nn.Module | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        lr: float = 1e-3,
        router_lr: float | None = None,
        group_lrs: dict[str, float] | None = None,
        weight_decay: float = 0.0,
        aux_loss_weight: float = 1.0,
    ):
        super().__init__()
        if not isinstance(model, MoAModel):
            raise UserTypeError(f"MoAModule hosts a MoAModel (see moa.attach), got {type(model).__name__}")
        self.model = model
        self.head = head
        self.loss_fn = loss_fn or F.cross_entropy
        self.lr, self.router_lr, self.group_lrs = lr, router_lr, dict(group_lrs or {})
        self.weight_decay, self.aux_loss_weight = weight_decay, aux_loss_weight
        self.save_hyperparameters(ignore=["model", "head", "loss_fn"])
        self._calibration: dict[str, list[tuple[Tensor, Tensor]]] = {}  # stage -> (probs, labels) of the epoch
        self._followers: list[OptimizerFollower] = []
        self.strict_loading = False  # checkpoints hold the trainable part only (see on_save_checkpoint)

    def forward(self, batch: dict) -> Tensor:
        """Model output (no head) or the head's logits."""
        outputs = self.model(**model_inputs(batch, keep_labels=self.head is None))
        return outputs if self.head is None else self.apply_head(outputs, batch)

    def apply_head(self, outputs, batch: dict) -> Tensor:
        """The head's output on the model's last hidden states (subclasses may pass more of the batch)."""
        return self.head(_last_hidden(outputs), batch.get("attention_mask"))

    def _loss(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        out = self(batch)
        if self.head is None:
            if getattr(out, "loss", None) is None:
                raise UserError("the model returned no loss: put 'labels' in the batch or give MoAModule a head")
            return out.loss, None
        if "labels" not in batch:
            raise UserError("the batch has no 'labels' for the head's loss")
        return self.loss_fn(out, batch["labels"]), out

    def on_fit_start(self) -> None:
        """Train in train mode. ``from_pretrained`` returns the backbone in eval mode and Lightning keeps every
        submodule's mode, so without this routers, routing noise and dropout would stay off for the whole fit.
        The evaluation loops switch to eval mode and restore this afterwards."""
        self.train()
        if self.trainer.is_global_zero:
            self.model.print_trainable_parameters()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints hold what training changes (adapters, routers, heads, trainable modules), not the frozen base
        model, which the module rebuilds from its backbone when it is constructed."""
        keep = self._adapter_keys() | {name for name, p in self.named_parameters() if p.requires_grad}
        if self.head is not None:
            keep |= {f"head.{key}" for key in self.head.state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def _adapter_keys(self) -> set[str]:
        """This module's state-dict keys of everything MoA adds (see :meth:`MoAModel.moa_state_dict`)."""
        keys = set()
        for key in self.model.moa_state_dict():
            if key.startswith(SHARED_PREFIX):
                keys.add(f"model.shared.{key[len(SHARED_PREFIX):]}")
            else:
                keys.add(f"model.model.{key.removeprefix(SAVED_PREFIX)}")
        return keys

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint must carry every adapter and head weight; the frozen base comes from the backbone."""
        state = checkpoint["state_dict"]
        missing = sorted(self._adapter_keys() - set(state))
        if missing:
            raise UserError(f"the checkpoint lacks adapter weights of this model, e.g. {missing[:3]}: it was "
                             "saved from another model configuration")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        batch_size = _batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        total = loss
        for name, value in self.model.aux_losses().items():
            self.log(f"train/aux/{name}", value, batch_size=batch_size)
            total = total + self.aux_loss_weight * value
        stats = self.model.routing_stats()
        if stats:
            entropy = torch.stack([-(u * u.clamp_min(1e-12).log()).sum() for u in stats.values()]).mean()
            self.log("train/routing_entropy", entropy, batch_size=batch_size)
        return total

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch: dict, stage: str) -> Tensor:
        loss, logits = self._loss(batch)
        batch_size = _batch_size(batch)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size)
        if logits is not None and logits.dim() == 2:
            self.log(f"{stage}/accuracy", (logits.argmax(-1) == batch["labels"]).float().mean(), batch_size=batch_size)
            labels = batch["labels"]
            if labels.dim() == 1 and not labels.dtype.is_floating_point:  # classification: keep for calibration
                probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
                self._calibration.setdefault(stage, []).append((probs, labels.detach().cpu()))
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_calibration("val")

    def on_test_epoch_end(self) -> None:
        self._log_calibration("test")

    def _log_calibration(self, stage: str) -> None:
        """ECE, MCE, ACE, classwise ECE and Brier over the whole epoch's predictions (see :mod:`moa.metrics`)."""
        collected = self._calibration.pop(stage, [])
        if not collected:
            return
        probs, labels = torch.cat([p for p, _ in collected]), torch.cat([y for _, y in collected])
        metrics = calibration_metrics(probs, labels)
        for name in ("ece", "mce", "ace", "classwise_ece", "brier"):
            self.log(f"{stage}/{name}", metrics[name])

    def on_train_start(self) -> None:
        """Components that follow optimizer steps (FlyLoRA's bias, HypeLoRA's annealing) follow this fit's
        optimizers (whatever ``configure_optimizers`` returned, in this class or a subclass)."""
        self.on_train_end()
        total, step = self.trainer.estimated_stepping_batches, self.trainer.global_step
        self._followers = [follow_optimizer(self.model, opt, total, step) for opt in self.trainer.optimizers]

    def on_train_end(self) -> None:
        for follower in self._followers:
            follower.remove()
        self._followers = []

    def configure_optimizers(self):
        groups = self.model.param_groups()
        if self.head is not None:
            groups.setdefault("experts", []).extend(p for p in self.head.parameters() if p.requires_grad)
        lrs = {"experts": self.lr, "router": self.router_lr if self.router_lr is not None else self.lr, **self.group_lrs}
        param_groups = []
        for name, params in groups.items():
            if name not in lrs:
                raise UserError(f"routers declared a parameter group {name!r}; give its lr in group_lrs")
            decay = self.weight_decay if name == "experts" else 0.0
            param_groups.append({"params": params, "lr": lrs[name], "weight_decay": decay, "name": name})
        return torch.optim.AdamW(param_groups)


NOT_MODEL_INPUTS = ("row",)  # batch keys for the module (a row's position in its split), not for the model


def model_inputs(batch: dict, keep_labels: bool) -> dict:
    """The batch entries the model takes: without ``labels`` when a head computes the loss."""
    drop = NOT_MODEL_INPUTS if keep_labels else (*NOT_MODEL_INPUTS, "labels")
    return {k: v for k, v in batch.items() if k not in drop}


def _last_hidden(outputs) -> Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None and getattr(outputs, "hidden_states", None) is not None:
        hidden = outputs.hidden_states[-1]
    if hidden is None:
        raise UserError("the model output has no last_hidden_state; call it with output_hidden_states=True")
    return hidden


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1
