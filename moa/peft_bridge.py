"""Interop with PEFT through plain LoRA adapter folders, using only PEFT's public API.

* :func:`from_peft` turns existing PEFT LoRA adapters into the experts of a pool (expert e routed with weight 1
  gives the same outputs as PEFT with adapter e active).
* :func:`to_peft` exports a fixed route (one expert, or a fixed mixture reduced exactly to one LoRA) or one task's
  adapter (Poly / MHR: the task's mixture of skills) as an adapter folder that ``PeftModel.from_pretrained`` and
  ``AutoPeftModel*.from_pretrained`` load, with the ``modules_to_save`` (a classifier head).

Adapters of different ranks or alphas share one pool: ranks are zero-padded to the largest (exact), and each
adapter's own scale is folded into its B so the pool uses scale 1.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .config import MoAConfig
from .model import MoAModel, attach, check_output_mixture, route_to_mixture
from moa.experts.errors import UserError, UserTypeError
from moa.routers.poly import mix_skills

PEFT_PREFIX = "base_model.model."
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer replication",
    "lora_bias": "LoRA bias terms",
}


def _read_adapter(path: Path) -> tuple[LoraConfig, dict[str, tuple[Tensor, Tensor]]]:
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    config = PeftConfig.from_pretrained(str(path))
    if not isinstance(config, LoraConfig):
        raise UserError(f"{path} holds a {type(config).__name__}; only LoRA adapters can become experts")
    for attr, what in _UNSUPPORTED.items():
        if getattr(config, attr, None):
            raise UserError(f"{path}: {what} cannot be imported as plain LoRA experts")
    state = load_peft_weights(str(path), device="cpu")
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise UserError(f"{path}: unexpected tensor {key!r} in a LoRA adapter")
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                modules.setdefault(key[len(PEFT_PREFIX) : -len(suffix)], {})[part] = value
                break
        else:
            raise UserError(f"{path}: {key!r} is not a LoRA A/B weight (embedding or other layers are not supported)")
    scale_of = (lambda r: config.lora_alpha / math.sqrt(r)) if config.use_rslora else (lambda r: config.lora_alpha / r)
    factors = {}
    for name, ab in modules.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise UserError(f"{path}: module {name!r} lacks {sorted({'lora_A', 'lora_B'} - set(ab))}")
        a, b = ab["lora_A"], ab["lora_B"]
        factors[name] = (a, b * scale_of(a.shape[0]))  # scale folded into B
    return config, factors


def from_peft(
    base_model: nn.Module,
    adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    router: str = "static",
    **config_kwargs,
) -> MoAModel:
    """Attach a pool whose expert e is the PEFT LoRA adapter ``adapters[e]`` (a folder saved by PEFT).

    ``adapters`` maps expert names to folders (or is a list of folders, named by folder). The pool adapts the
    union of the adapters' target modules; an adapter that does not touch a module contributes zero there.
    """
    if not isinstance(adapters, Mapping):
        adapters = {Path(p).name: p for p in adapters}
    if not adapters:
        raise UserError("from_peft needs at least one adapter folder")
    read = {name: _read_adapter(Path(path)) for name, path in adapters.items()}
    modules = sorted({m for _, factors in read.values() for m in factors})
    rank = max(a.shape[0] for _, factors in read.values() for a, _ in factors.values())
    config_kwargs.setdefault("top_k", min(2, len(read)))
    config = MoAConfig(
        n_experts=len(read), r=rank, alpha=rank, router=router, target_modules=modules,
        expert_names=list(read), **config_kwargs,
    )
    moa_model = attach(base_model, config, layers=modules)
    try:
        _copy_experts(moa_model, read)
    except BaseException:
        moa_model.unload()  # leave the caller's model as it was
        raise
    return moa_model


def _copy_experts(moa_model: MoAModel, read: dict[str, tuple[LoraConfig, dict[str, tuple[Tensor, Tensor]]]]) -> None:
    layers = moa_model.moa_layers()
    with torch.no_grad():
        for name, layer in layers.items():
            pool = layer.pool
            pool.lora_A.zero_()
            pool.lora_B.zero_()
            for e, (_, factors) in enumerate(read.values()):
                if name not in factors:
                    continue
                a, b = factors[name]
                if a.shape[1] != pool.in_features or b.shape[0] != pool.out_features:
                    raise UserError(
                        f"adapter {list(read)[e]!r} module {name!r} is {b.shape[0]}x{a.shape[1]}, "
                        f"the model's layer is {pool.out_features}x{pool.in_features}"
                    )
                r_e = a.shape[0]
                pool.A[e, :r_e].copy_(a)
                pool.B[e, :, :r_e].copy_(b)


def to_peft(
    moa_model: MoAModel,
    directory: str | os.PathLike,
    route: int | Sequence[float] | Tensor | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    *,
    task: int | None = None,
) -> Path:
    """Export a fixed route, or one task's adapter, as a PEFT LoRA adapter folder (expert 0 when neither is given).

    ``route``: one expert exports as itself (rank r, same alpha). A fixed mixture ``sum_e m_e s B_e A_e`` exports
    exactly as one LoRA of rank ``r * (number of experts with m_e != 0)``: A is the experts' A stacked, B their
    ``m_e``-weighted B side by side.

    ``task``: the adapter the router gives that task. Poly / MHR: the task's mixture of skills as the routers compute
    it in evaluation, ``A_t = sum_k w_tk A_k`` and ``B_t = sum_k w_tk B_k`` (per head block for MHR), one LoRA of
    rank r, exact. ``static`` keyed on ``task_ids``: expert ``task``. Routers that choose experts per token have no
    single adapter per task and are refused.

    The folder loads with ``PeftModel.from_pretrained(base, folder)`` and, without a base, with ``AutoPeftModel`` /
    ``AutoPeftModelFor<Task>.from_pretrained(folder)``: it records the base's folder (``base_model_name_or_path``,
    by default the one the base was loaded from) and class (``auto_mapping``, as PEFT writes for an adapter without
    ``task_type``); the ``modules_to_save`` (a classifier head) are exported in full. As for PEFT's own adapters,
    a head whose size the base folder does not say needs it again: ``from_pretrained(folder, num_labels=3)``.
    The folder is written completely or not at all.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True to replace it")
    if task is not None and route is not None:
        raise UserError("give a route or a task to export, not both")
    if task is not None:
        factors = _task_factors(moa_model, task)
    else:
        factors = _route_factors(moa_model, 0 if route is None else route)
    layers = moa_model.moa_layers()
    rank = next(iter(factors.values()))[0].shape[0]
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().contiguous().cpu()
    saved = moa_model.saved_modules()
    for name in saved:  # PEFT saves a module of modules_to_save under its own name
        for key, value in moa_model.model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().contiguous().cpu()
    base = moa_model.model
    recorded = getattr(getattr(base, "config", None), "_name_or_path", None) or None  # from_pretrained's source
    config = LoraConfig(
        r=rank,
        lora_alpha=next(iter(layers.values())).pool.scaling * rank,
        target_modules=sorted(layers),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=any(isinstance(layer.base_layer, Conv1D) for layer in layers.values()),
        base_model_name_or_path=base_model_name_or_path or recorded,
        modules_to_save=saved or None,
    )
    auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        config.save_pretrained(str(tmp), auto_mapping_dict=auto_mapping)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _route_factors(moa_model: MoAModel, route: int | Sequence[float] | Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer, ``(A [R, d_in], B [d_out, R])`` of a fixed route as one LoRA (the pool's scale left out)."""
    mixture = route_to_mixture(route, moa_model.config.n_experts)
    active = torch.nonzero(mixture).flatten().tolist()
    if not active:
        raise UserError("the route gives every expert weight 0; there is nothing to export")
    check_output_mixture(moa_model)
    factors = {}
    for name, layer in moa_model.moa_layers().items():
        pool = layer.pool
        rank = pool.r * len(active)
        a = pool.A[active].reshape(rank, pool.in_features)
        b = pool.B[active] * mixture[active].to(pool.B).view(-1, 1, 1)
        b = b.permute(1, 0, 2).reshape(pool.out_features, rank)
        factors[name] = (a, b)
    return factors


def _task_id(task: object) -> int:
    """``task`` as an int (a Python, numpy or 0-d tensor integer; not a bool)."""
    if not isinstance(task, bool):
        with contextlib.suppress(TypeError):
            return operator.index(task)
    raise UserTypeError(f"task must be an integer task id, got {task!r}")


def _task_factors(moa_model: MoAModel, task: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer, ``(A [r, d_in], B [d_out, r])`` of the adapter the router gives ``task`` (see :func:`to_peft`)."""
    task = _task_id(task)
    layers = moa_model.moa_layers()
    router = next(iter(layers.values())).router
    if router.name == "static":
        if router.key != "task_ids":
            raise UserError(f"router 'static' routes by {router.key}, not task ids: export expert e with route=e")
        if not 0 <= task < router.n_experts:
            raise UserError(f"task {task} out of range: the pool holds one expert per task, {router.n_experts} in all")
        return _route_factors(moa_model, task)
    if not hasattr(router, "task_skill_weights"):  # Poly, MHR: one mixture of skills per task
        raise UserError(
            f"router {router.name!r} chooses experts per token, so one task is not a single LoRA adapter: export a "
            "fixed route instead (route=expert index or per-expert weights)"
        )
    if not 0 <= task < router.n_tasks:
        raise UserError(f"task {task} out of range: router {router.name!r} has {router.n_tasks} tasks")
    factors = {}
    for name, layer in layers.items():
        pool = layer.pool
        weights = layer.router.task_skill_weights()[task : task + 1].to(pool.A.device)  # [1, heads, skills]
        a, b = mix_skills(pool.A, pool.B, weights)
        factors[name] = (a[0], b[0])
    return factors
