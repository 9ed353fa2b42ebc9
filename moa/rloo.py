"""RLOO training for sampled routers (ReMix): M routing samples per example in one batched forward.

``RLOOModule.training_step`` repeats the batch M times along the batch dimension, so the M copies of every example
share one forward pass and each draws its own routing (the routers sample per row). With ``L[m, b]`` the loss of
example b under draw m and ``log Q[m, b]`` the log-probability of that draw (summed over the sampling routers'
layers, and over tokens for per-token routing), the step minimises the surrogate

    mean_{m,b} L[m, b]  +  mean_b  sum_m  stopgrad(L[m, b] - mean_m' L[m', b]) * log Q[m, b] / (M - 1)

The first term gives the LoRAs their ordinary gradient averaged over the M draws (the selection is discrete and
the routing weights constant, so it gives the routers nothing); the second gives the routers exactly the RLOO
estimate ``1/(M-1) sum_m (L_m - mean L) grad log Q_m`` of ``grad E[L]``, per example, averaged over the batch
(``log Q`` is computed from detached layer inputs, so this term reaches the routers only).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lightning import MoAModule, _batch_size
from .model import MoAModel
from moa.experts.errors import UserError

SampleLoss = Callable[[Any, dict], Tensor]


def rloo_objective(losses: Tensor, log_probs: Tensor | None) -> Tensor:
    """The RLOO surrogate above for ``losses [M, B]`` and ``log_probs [M, B]`` (``None``: no sampling router).

    The advantage is computed as ``mean_m' (L_m - L_m')``, which is exactly zero when the M losses are equal.
    """
    if losses.dim() != 2 or losses.shape[0] < 2:
        raise UserError(f"RLOO needs losses of shape [M >= 2, B], got {tuple(losses.shape)}")
    objective = losses.mean()
    if log_probs is None:
        return objective
    if log_probs.shape != losses.shape:
        raise UserError(f"log_probs {tuple(log_probs.shape)} must match losses {tuple(losses.shape)}")
    detached = losses.detach()
    advantage = (detached.unsqueeze(1) - detached.unsqueeze(0)).mean(1)  # [M, B]: L_m - mean_m' L_m'
    return objective + (advantage * log_probs).sum(0).mean() / (losses.shape[0] - 1)


def classification_sample_loss(logits: Tensor, batch: dict) -> Tensor:
    """Per-example cross-entropy of a head's logits ``[B, C]``."""
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def causal_lm_sample_loss(outputs: Any, batch: dict) -> Tensor:
    """Per-sequence mean next-token cross-entropy over the label tokens (``-100`` ignored): ``[B]``."""
    logits = outputs.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    valid = (labels != -100).to(token_loss.dtype)
    return (token_loss.view(labels.shape) * valid).sum(1) / valid.sum(1).clamp_min(1)


def repeat_batch(batch: dict, copies: int) -> dict:
    """Every per-example entry (tensors and lists whose first dimension is the batch size) ``copies`` times:
    row ``m * B + b`` is copy m of example b."""
    size = _batch_size(batch)
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value.repeat(copies, *([1] * (value.dim() - 1)))
        elif isinstance(value, (list, tuple)) and len(value) == size:
            out[key] = type(value)(list(value) * copies)
        else:
            out[key] = value
    return out


def sampling_routers(model: MoAModel) -> dict[str, nn.Module]:
    """Routers that sample their selection and return its log-probability (``Router.sampling``), by layer."""
    return {name: layer.router for name, layer in model.moa_layers().items() if getattr(layer.router, "sampling", False)}


@contextlib.contextmanager
def collect_log_probs(model: MoAModel) -> Iterator[list[tuple[str, Tensor]]]:
    """Inside the block, ``(layer, Routing.log_prob)`` of every sampling router's forward call, in call order
    (forward hooks on the routers, removed at the end of the block, so a re-run by activation checkpointing during
    backward adds nothing)."""
    collected: list[tuple[str, Tensor]] = []

    def hook(name):
        def keep(router, args, routing):
            if routing.log_prob is not None:
                collected.append((name, routing.log_prob))
        return keep

    handles = [router.register_forward_hook(hook(name)) for name, router in sampling_routers(model).items()]
    try:
        yield collected
    finally:
        for handle in handles:
            handle.remove()


def _is_causal_lm(model: MoAModel) -> bool:
    name = type(model.model).__name__
    return "CausalLM" in name or "LMHead" in name


class RLOOModule(MoAModule):
    """:class:`MoAModule` whose training step runs ``n_samples`` routing draws per example (see the module doc).

    Args:
        model: a model with sampling routers (``router="remix"``).
        n_samples: M >= 2 draws per example; the step costs about M plain steps of the same batch.
        sample_loss: ``sample_loss(output, batch) -> [B]`` per-example loss (the reward is its negative).
            ``output`` is the head's output when a head is given, else the model's output. Defaults: per-example
            cross-entropy with a head, per-sequence mean token cross-entropy for a causal LM.
        **kwargs: as for :class:`MoAModule` (``head``, ``lr``, ``router_lr``, ...). Validation and test steps are
            MoAModule's, with deterministic top-k routing in eval mode.

    Logged: ``train/loss`` (mean over draws), ``train/support_size`` (ESS of the routing weights, k by
    construction for ReMix), ``train/router_support`` (mean ``exp(entropy(q))`` of the routers' distributions), and
    ``train/rloo/loss_spread`` (mean over examples of the std of the M losses, the reward signal's size).
    """

    def __init__(self, model: MoAModel, n_samples: int = 4, sample_loss: SampleLoss | None = None, **kwargs):
        super().__init__(model, **kwargs)
        if not isinstance(n_samples, int) or n_samples < 2:
            raise UserError(f"RLOO needs n_samples >= 2 draws per example, got {n_samples!r}")
        if not sampling_routers(model):
            raise UserError("RLOOModule trains sampling routers (router='remix'); this model has none")
        # sample_loss None: chosen when training needs it (a head may still be built in configure_model)
        self.n_samples, self._sample_loss = n_samples, sample_loss

    @property
    def sample_loss(self) -> SampleLoss:
        """The per-example loss: the one given, else cross-entropy of the head, else the causal-LM token loss."""
        if self._sample_loss is not None:
            return self._sample_loss
        if self.head is not None:
            return classification_sample_loss
        if _is_causal_lm(self.model):
            return causal_lm_sample_loss
        raise UserError(f"no default per-example loss for {type(self.model.model).__name__} without a head: "
                         "pass sample_loss=...")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        size, copies = _batch_size(batch), self.n_samples
        repeated = repeat_batch(batch, copies)
        with collect_log_probs(self.model) as log_probs:
            losses = self.example_losses(repeated)
        if losses.shape != (copies * size,):
            raise UserError(f"sample_loss must return one loss per example ({copies * size},), got {tuple(losses.shape)}")
        losses = losses.view(copies, size)
        total = rloo_objective(losses, self._joint_log_prob(log_probs, copies, size))

        self.log("train/loss", losses.mean(), prog_bar=True, batch_size=size)
        self.log("train/rloo/loss_spread", losses.detach().std(0).mean(), batch_size=size)
        for name, value in self.model.aux_losses().items():
            self.log(f"train/aux/{name}", value, batch_size=size)
            total = total + self.aux_loss_weight * value
        routers = sampling_routers(self.model).values()
        for stat, attribute in (("support_size", "last_support_size"), ("router_support", "last_router_support")):
            values = [getattr(r, attribute) for r in routers if getattr(r, attribute, None) is not None]
            if values:
                self.log(f"train/{stat}", torch.stack(values).float().mean(), batch_size=size)
        return total

    def example_losses(self, batch: dict) -> Tensor:
        """``[B]``: each example's loss under this call's routing draws (subclasses with their own loss override)."""
        return self.sample_loss(self(batch), batch)  # the model's output, or the head's

    @staticmethod
    def _joint_log_prob(log_probs: list[tuple[str, Tensor]], copies: int, size: int) -> Tensor | None:
        """``log Q [M, B]`` of each row's draws, summed over the sampling layers of the call."""
        total = None
        for name, value in log_probs:
            if value.shape != (copies * size,):
                raise UserError(
                    f"router of {name} reported log-probabilities of shape {tuple(value.shape)}; RLOO needs one per "
                    f"sequence ({copies * size},): give the layer inputs as [batch, tokens, features]"
                )
            total = value if total is None else total + value
        return None if total is None or not total.requires_grad else total.view(copies, size)
