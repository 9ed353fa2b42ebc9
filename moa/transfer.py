"""Few-shot transfer and inspection for task-routed models (``router="poly"`` / ``"mhr"``).

Adaptation modes (:func:`prepare_transfer`, mttl ``pl_finetune.py`` ``finetune_type`` in brackets):

* ``"full"`` (Poly): fresh routing rows for the new tasks; skills and routing logits train (Poly / MHR fine-tuning).
* ``"z"`` (Z): fresh routing rows; *only* the routing logits train, every skill and everything else is frozen (MHR-z).
* ``"mu"`` (MuZ): routing replaced by the per-head average of the skills (uniform weights, mttl's
  ``AverageSelector``), which is one rank-r LoRA ``(mean_k A_k, mean_k B_k)``; the skills train (MHR-mu).

Inspection: :func:`task_skill_matrix` reads out the learned task-skill weights per layer, and
:func:`plot_task_skill_matrix` draws them as a heat map.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from moa.experts import LoRAPool
from moa.experts.errors import UserError
from moa.routers.poly import SHARED_KEY, _TaskSkillRouter, skills_from_split_layout

from .model import MoAModel

MODES = ("full", "z", "mu")


def task_routers(model: MoAModel) -> dict[str, _TaskSkillRouter]:
    """The Poly / MHR routers of ``model``, by layer."""
    routers = {name: layer.router for name, layer in model.moa_layers().items() if isinstance(layer.router, _TaskSkillRouter)}
    if not routers:
        raise UserError(f"the model has no task-routed layers (router={model.config.router!r}; want 'poly' or 'mhr')")
    return routers


def resize_tasks(model: MoAModel, n_tasks: int, keep_existing: bool = False) -> MoAModel:
    """Give every routing-logit matrix Z ``n_tasks`` rows (new rows U(+-1e-3), as mttl's ``resize_module_logits``).

    ``keep_existing`` keeps the rows of tasks ``0 .. min(old, new) - 1`` (to add tasks next to the trained ones);
    by default every row is re-drawn (a new task must not start from an old task's row). The config is updated,
    so :meth:`MoAModel.save_pretrained` / :func:`moa.load` round-trip the new shape. Build the optimizer afterwards.
    """
    routers = task_routers(model)
    shared = model.shared[SHARED_KEY] if SHARED_KEY in model.shared else None
    if shared is not None:
        shared.resize(n_tasks, keep_existing)
    for router in routers.values():
        if router.granularity == "layer":
            router.resize(n_tasks, keep_existing)
        else:
            router._n_tasks = n_tasks
    model.config.router_options["n_tasks"] = n_tasks
    return model


def prepare_transfer(model: MoAModel, mode: str, n_tasks: int = 1) -> MoAModel:
    """Set ``model`` up for few-shot transfer to ``n_tasks`` new tasks (ids ``0 .. n_tasks - 1``), in place.

    ``mode`` is ``"full"`` (Poly / MHR fine-tuning), ``"z"`` (MHR-z) or ``"mu"`` (MHR-mu); see the module doc.
    Everything outside the MoA layers stays frozen (a head of yours is yours to freeze or not).
    """
    if mode not in MODES:
        raise UserError(f"unknown adaptation mode {mode!r}; choose from {MODES} (Poly fine-tuning, MHR-z, MHR-mu)")
    routers = task_routers(model)
    resize_tasks(model, n_tasks)
    average = mode == "mu"
    for router in routers.values():
        router.set_average(average)
    model.config.router_options["average"] = average
    train_skills, train_logits = mode != "z", mode != "mu"
    for layer in model.moa_layers().values():
        for param in layer.pool.parameters():
            param.requires_grad_(train_skills)
        for param in layer.router.parameters():
            param.requires_grad_(False)
        if isinstance(layer.router, _TaskSkillRouter):
            layer.router.logits_module.logits.requires_grad_(train_logits)
    for name, module in model.shared.items():
        if name != SHARED_KEY:
            module.requires_grad_(train_skills)
    return model


def task_skill_matrix(model: MoAModel) -> dict[str, Tensor]:
    """Evaluation-mode routing weights ``[n_tasks, n_heads, n_skills]`` by layer (``{"shared": ...}`` when shared)."""
    routers = task_routers(model)
    first = next(iter(routers.values()))
    if first.granularity == "shared":
        return {"shared": first.task_skill_weights()}
    return {name: router.task_skill_weights() for name, router in routers.items()}


def plot_task_skill_matrix(
    model_or_matrices: MoAModel | Mapping[str, Tensor],
    path: str | os.PathLike,
    task_names: Sequence[str] | None = None,
    max_panels: int = 24,
) -> Path:
    """Save the task-skill matrices as a heat map PNG (one panel per layer; columns: head-major, then skill)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    matrices = task_skill_matrix(model_or_matrices) if isinstance(model_or_matrices, MoAModel) else dict(model_or_matrices)
    if not matrices:
        raise UserError("no task-skill matrices to plot")
    names = list(matrices)[:max_panels]
    n_tasks, n_heads, n_skills = next(iter(matrices.values())).shape
    if task_names is not None and len(task_names) != n_tasks:
        raise UserError(f"{len(task_names)} task names for {n_tasks} tasks")
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    vmax = max(float(matrices[n].max()) for n in names)
    panel_w, panel_h = min(0.15 * n_heads * n_skills + 1.5, 7.0), min(0.22 * n_tasks + 1.2, 6.0)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols + 1.0, panel_h * rows), squeeze=False,
                             constrained_layout=True)
    image = None
    for ax, name in zip(axes.flat, names):
        image = ax.imshow(matrices[name].reshape(n_tasks, n_heads * n_skills).numpy(), vmin=0, vmax=vmax,
                          cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(name if len(name) <= 40 else "..." + name[-37:], fontsize=8)
        ax.set_xlabel(f"skill (head-major: {n_heads} x {n_skills})" if n_heads > 1 else "skill", fontsize=7)
        for q in range(1, n_heads):
            ax.axvline(q * n_skills - 0.5, color="white", linewidth=0.5)
        ax.set_yticks(range(n_tasks))
        ax.set_yticklabels(task_names if task_names is not None else range(n_tasks), fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="routing weight")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def load_peft_poly(model: MoAModel, peft_model: nn.Module, adapter: str = "default") -> MoAModel:
    """Copy the skills and routing logits of an HF PEFT Poly model into ``model`` (same layers, K, h, r, tasks).

    All or nothing: every PEFT Poly layer must correspond to exactly one moa layer and back (a PEFT layer is named
    by the moa layer's full name or ends with ``"." + name``), with the same heads (``n_splits``), skills, rank,
    features and tasks; ``model`` must use ``granularity="layer"`` (PEFT has one router per layer), LoRA skills,
    the PEFT scale (``alpha=1``, the default for these routers) and no ``average`` (MHR-mu: call
    :func:`prepare_transfer` after loading). Everything is checked first; on any mismatch a ``ValueError`` names
    the layer and ``model`` is left unchanged. PEFT's ``poly_lora_A [h, K, d_in/h, r]`` / ``poly_lora_B
    [h, K, r, d_out/h]`` become the pool's ``A [K, r, d_in]`` / ``B [K, d_out, r]``; ``module_logits`` is Z as it is.
    """
    routers = task_routers(model)
    peft_layers = {name: m for name, m in peft_model.named_modules() if hasattr(m, "poly_lora_A") and adapter in m.poly_lora_A}
    if not peft_layers:
        raise UserError(f"no PEFT Poly layers with adapter {adapter!r} in the given model")
    layers = model.moa_layers()
    not_routed = sorted(set(layers) - set(routers))
    if not_routed:
        raise UserError(f"moa layers {not_routed} are not task-routed; PEFT Poly routes every layer by task")
    # 1. pair the layers, one to one
    pairs, claimed = {}, {}
    for name in layers:
        matches = [n for n in peft_layers if n == name or n.endswith("." + name)]
        if len(matches) != 1:
            raise UserError(f"moa layer {name!r} has {len(matches)} PEFT Poly layers for adapter {adapter!r}"
                             + (f": {matches}" if matches else " (the PEFT model does not adapt it)"))
        if matches[0] in claimed:
            raise UserError(f"PEFT Poly layer {matches[0]!r} matches moa layers {claimed[matches[0]]!r} and {name!r}")
        pairs[name], claimed[matches[0]] = matches[0], name
    missing = sorted(set(peft_layers) - set(claimed))
    if missing:
        raise UserError(f"the moa model does not adapt the PEFT Poly layers {missing} (add them to target_modules); "
                         "importing the rest would give outputs that differ from PEFT's")
    # 2. check every pair, build what to copy
    copies = []
    for name, peft_name in pairs.items():
        source, router, pool = peft_layers[peft_name], routers[name], layers[name].pool
        if router.granularity != "layer":
            raise UserError(f"{name}: PEFT Poly has one router per layer: load it into a model with granularity='layer'")
        if router.average:
            raise UserError(f"{name}: the router averages the skills (MHR-mu); load first, then prepare_transfer(..., 'mu')")
        if getattr(source, "poly_type", {}).get(adapter, "poly") != "poly":
            raise UserError(f"{peft_name}: PEFT poly_type={source.poly_type[adapter]!r}; only 'poly' is supported")
        if source.n_splits[adapter] != router.n_heads:
            raise UserError(f"{name}: PEFT n_splits={source.n_splits[adapter]} but the router has n_heads={router.n_heads}")
        if not isinstance(pool, LoRAPool):
            raise UserError(f"{name}: the pool is a {type(pool).__name__}; PEFT skills load into LoRA skills (expert_kind='lora')")
        a_split, b_split = source.poly_lora_A[adapter], source.poly_lora_B[adapter]
        if a_split.dim() != 4 or b_split.dim() != 4 or a_split.shape[:2] != b_split.shape[:2] \
                or a_split.shape[3] != b_split.shape[2]:
            raise UserError(f"{peft_name}: PEFT skills A {tuple(a_split.shape)}, B {tuple(b_split.shape)} are not "
                             "[h, K, d_in/h, r] and [h, K, r, d_out/h]")
        A, B = skills_from_split_layout(a_split, b_split)
        if A.shape != pool.A.shape or B.shape != pool.B.shape:
            raise UserError(f"{name}: PEFT skills A {tuple(A.shape)}, B {tuple(B.shape)} do not fit the pool "
                             f"A {tuple(pool.A.shape)}, B {tuple(pool.B.shape)} ([K, r, d_in], [K, d_out, r])")
        if abs(pool.scaling - 1.0 / pool.r) > 1e-12:
            raise UserError(f"{name}: PEFT Poly scales by 1/r; this pool scales by {pool.scaling:g} (set alpha=1)")
        logits, z = source.poly_router[adapter].module_logits, router.logits_module.logits
        if logits.shape != z.shape:
            raise UserError(f"{name}: PEFT routing logits {tuple(logits.shape)} vs {tuple(z.shape)} "
                             "([n_tasks, n_heads * n_skills])")
        copies += [(pool.A, A), (pool.B, B), (z, logits)]
    # 3. copy (pool.A / pool.B are views of the packed weights); nothing above has written to the model
    for target, value in copies:
        target.copy_(value)
    return model
