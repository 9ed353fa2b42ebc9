"""Interop with PEFT through plain LoRA adapter folders, using only PEFT's public API.

* :func:`from_peft` turns existing PEFT LoRA adapters into the experts of a pool (expert e routed with weight 1
  gives the same outputs as PEFT with adapter e active).
* :func:`to_peft` exports a fixed route (one expert, or a fixed mixture reduced exactly to one LoRA) as an adapter
  folder that ``PeftModel.from_pretrained`` loads.

Adapters of different ranks or alphas share one pool: ranks are zero-padded to the largest (exact), and each
adapter's own scale is folded into its B so the pool uses scale 1.
"""

from __future__ import annotations

import math
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
from moa.experts.errors import UserError

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
    route: int | Sequence[float] | Tensor = 0,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a fixed route as a PEFT LoRA adapter folder.

    One expert exports as itself (rank r, same alpha). A fixed mixture ``sum_e m_e s B_e A_e`` exports exactly as
    one LoRA of rank ``r * (number of experts with m_e != 0)``: A is the experts' A stacked, B their ``m_e``-weighted
    B side by side. The folder is written completely or not at all.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True to replace it")
    mixture = route_to_mixture(route, moa_model.config.n_experts)
    active = torch.nonzero(mixture).flatten().tolist()
    if not active:
        raise UserError("the route gives every expert weight 0; there is nothing to export")
    check_output_mixture(moa_model)
    layers = moa_model.moa_layers()
    pool0 = next(iter(layers.values())).pool
    rank = pool0.r * len(active)
    tensors = {}
    for name, layer in layers.items():
        pool = layer.pool
        a = pool.A[active].reshape(rank, pool.in_features)
        b = (pool.B[active] * mixture[active].to(pool.B.dtype).view(-1, 1, 1)).permute(1, 0, 2).reshape(pool.out_features, rank)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().contiguous().cpu()
    config = LoraConfig(
        r=rank,
        lora_alpha=pool0.scaling * rank,
        target_modules=sorted(layers),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=any(isinstance(layer.base_layer, Conv1D) for layer in layers.values()),
        base_model_name_or_path=base_model_name_or_path,
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
