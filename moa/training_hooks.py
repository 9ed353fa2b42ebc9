"""Components that follow optimizer steps, and the one call that binds an optimizer to them.

Some components change state at optimizer steps, not at forward calls: FlyLoRA's routers apply their
load-balancing update with the usage counted since the previous step, and HypeLoRA's hypernetwork advances its
noise annealing and drops its cached factors. Each implements

    after_optimizer_step(step: int, total_steps: int | None) -> None

where ``step`` counts the optimizer steps taken, this one included, and ``total_steps`` is the planned total
(``None``: unknown). :func:`follow_optimizer` registers one ``optimizer.register_step_post_hook`` (PyTorch's
per-optimizer hook) that calls it after every ``optimizer.step()``, for the components whose parameters that
optimizer holds: a layer's router and pool follow the steps that update the layer's MoA parameters (FlyLoRA's
router has none of its own; it follows its layer's B), a shared module those that update its own parameters.

``moa.lightning.MoAModule`` (and so ``RLOOModule``) binds the Trainer's optimizers when training starts. In a
plain loop, bind once::

    follower = follow_optimizer(model, optimizer, total_steps=epochs * len(loader) // accumulation)
    ...                          # forward, backward, optimizer.step() as usual
    follower.remove()            # or use it as a context manager
"""

from __future__ import annotations

import math

from torch import nn
from torch.optim import Optimizer

from .model import MoAModel
from moa.experts.errors import UserTypeError


def step_followers(model: MoAModel) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """``(component, the parameters whose optimizer it follows)`` for every component with ``after_optimizer_step``."""
    followers = []
    for layer in model.moa_layers().values():
        own = [p for name, p in layer.named_parameters() if not name.startswith("base_layer.")]
        followers += [(part, own) for part in (layer.router, layer.pool) if hasattr(part, "after_optimizer_step")]
    followers += [(m, list(m.parameters())) for m in model.shared.values() if hasattr(m, "after_optimizer_step")]
    return followers


class OptimizerFollower:
    """One optimizer bound to a model's step-following components (see the module docstring)."""

    def __init__(self, model: MoAModel, optimizer: Optimizer, total_steps: int | float | None = None, step: int = 0):
        if not isinstance(model, MoAModel):
            raise UserTypeError(f"follow_optimizer binds a MoAModel (see moa.attach), got {type(model).__name__}")
        if not hasattr(optimizer, "register_step_post_hook"):
            raise UserTypeError(f"follow_optimizer needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        known = total_steps is not None and math.isfinite(total_steps) and total_steps > 0
        self.total_steps = int(total_steps) if known else None
        self.step = int(step)
        self.followers = step_followers(model)
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: Optimizer, args, kwargs) -> None:
        self.step += 1
        if not self.followers:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for component, params in self.followers:
            if any(id(p) in held for p in params):
                component.after_optimizer_step(self.step, self.total_steps)

    def remove(self) -> None:
        """Unbind: later steps of the optimizer reach no component."""
        self._handle.remove()

    def __enter__(self) -> "OptimizerFollower":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def follow_optimizer(model: MoAModel, optimizer: Optimizer, total_steps: int | float | None = None,
                     step: int = 0) -> OptimizerFollower:
    """After every ``optimizer.step()``, call ``after_optimizer_step`` of the components of ``model`` whose
    parameters ``optimizer`` holds.

    ``total_steps``: the optimizer steps training will take (HypeLoRA anneals its noise over them unless its
    ``anneal_steps`` is set); ``None``, infinite or 0: unknown. ``step``: steps already taken (e.g. on resuming).
    Bind each optimizer once; the returned handle's ``remove()`` unbinds it.
    """
    return OptimizerFollower(model, optimizer, total_steps, step)
