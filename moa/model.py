"""Attach MoA layers to any transformers model; save, load and merge them."""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from moa.experts import PoolSpec
from moa.experts.errors import UserError
from moa.routers import CONTEXT_KEYS, RoutingContext, build_router

from .atomic import atomic_folder, read_json, read_safetensors, readable, verify
from .config import CONFIG_NAME, MoAConfig
from .layer import ContextSlot, MoALinear, linear_shape
from .pretrained import is_pretrained_name, resolve_pretrained

WEIGHTS_NAME = "moa_model.safetensors"
SHARED_PREFIX = "moa_shared."  # state-dict keys of the modules shared by all layers
SAVED_PREFIX = "moa_saved."  # state-dict keys of the base modules trained in full (modules_to_save)
FORMAT_VERSION = 1

# Defaults for target_modules when the config gives none; PEFT's table where available, so both libraries
# adapt the same layers of a model by default.
_FALLBACK_TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}
try:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as _PEFT_TARGETS
except ImportError:  # pragma: no cover - peft is a dependency, the table is an internal detail
    _PEFT_TARGETS = {}


class _SignedForward:
    """``MoAModel.forward``, seen with the wrapped model's signature plus the routing keywords, so that tools that
    read it (HF ``Trainer`` with ``remove_unused_columns=True``) keep the model's and the routing's columns."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return MoAModel._forward
        call = functools.partial(MoAModel._forward, obj)
        call.__signature__ = obj.forward_signature()
        return call


class MoAModel(nn.Module):
    """A transformers model whose target linear layers carry MoA pools; the base weights are frozen.

    ``forward`` (and ``generate``) accept the routing context as keyword arguments next to the model's own:
    ``task_ids``, ``domain_ids``, ``expert_ids`` (one id per sample ``[B]`` or per token ``[B, T]``) and
    ``expert_weights`` (a fixed mixture per sample ``[B, E]``).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MoAConfig,
        slot: ContextSlot,
        requires_grad: dict[str, bool],
        shared: nn.ModuleDict | None = None,
    ):
        super().__init__()
        self.model = model
        self.shared = shared if shared is not None else nn.ModuleDict()  # modules all layers use (hypernetworks, ...)
        self.config = config
        self._slot = slot
        self._base_requires_grad = requires_grad  # the base parameters' flags before attach froze them

    # -- calling -------------------------------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        self._set_context(kwargs)
        return self.model(*args, **kwargs)

    forward = _SignedForward()

    def forward_signature(self) -> inspect.Signature:
        """The wrapped model's ``forward`` signature plus the routing keywords (``task_ids``, ...)."""
        cached = self.__dict__.get("_forward_signature")
        if cached is None:
            base = inspect.signature(self.model.forward).parameters.values()
            params = [p for p in base if p.kind is not inspect.Parameter.VAR_KEYWORD]
            names = {p.name for p in params}
            params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in CONTEXT_KEYS
                       if k not in names]
            params += [p for p in base if p.kind is inspect.Parameter.VAR_KEYWORD]
            cached = self.__dict__["_forward_signature"] = inspect.Signature(params)
        return cached

    def generate(self, *args, **kwargs):
        """``generate`` with per-sample routing context (``[B]`` ids or ``[B, E]`` weights).

        Beam search and several return sequences grow the batch to ``B * n``; the context follows.
        transformers expands each row ``max(num_beams, num_return_sequences)`` times: ``num_beams`` for beam
        search (the returned sequences are picked among the beams), ``num_return_sequences`` for sampling.
        """
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        sequences = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
        self._set_context(kwargs, repeat=max(beams, sequences))
        return self.model.generate(*args, **kwargs)

    def _set_context(self, kwargs: dict[str, Any], repeat: int = 1) -> None:
        device = next(iter(self.moa_layers().values())).base_layer.weight.device
        values = {}
        for key in CONTEXT_KEYS:
            value = kwargs.pop(key, None)
            if value is not None:
                value = torch.as_tensor(value, device=device)
                if repeat > 1:
                    value = value.repeat_interleave(repeat, dim=0)
            values[key] = value
        mask = kwargs.get("attention_mask")
        token_mask = mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self._slot.current = RoutingContext(**values, token_mask=token_mask)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    # -- inspection ----------------------------------------------------------------------------------------
    def moa_layers(self) -> dict[str, MoALinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MoALinear)}

    def aux_losses(self) -> dict[str, Tensor]:
        """Auxiliary losses of the last forward call, summed over layers, by name."""
        total: dict[str, Tensor] = {}
        for layer in self.moa_layers().values():
            for name, value in layer.aux_losses.items():
                total[name] = total[name] + value if name in total else value
        return total

    def aux_loss(self) -> Tensor:
        """The sum of :meth:`aux_losses`; a zero scalar when the routers have none (``out.loss + model.aux_loss()``
        works for every router)."""
        losses = self.aux_losses()
        if losses:
            return sum(losses.values())
        return torch.zeros((), device=next(self.parameters()).device)

    def routing_stats(self) -> dict[str, Tensor]:
        """Per layer: the fraction of routing slots each expert received in the last forward call."""
        return {name: layer.last_usage for name, layer in self.moa_layers().items() if layer.last_usage is not None}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimizer group: ``"experts"`` and whatever groups the routers declare."""
        groups: dict[str, list[nn.Parameter]] = {"experts": []}
        for layer in self.moa_layers().values():
            groups["experts"].extend(p for p in layer.pool.parameters() if p.requires_grad)
            for name, params in layer.router.param_groups().items():
                groups.setdefault(name, []).extend(params)
        for module in self.shared.values():  # a shared module may say its group; experts by default
            if hasattr(module, "param_groups"):
                for name, params in module.param_groups().items():
                    groups.setdefault(name, []).extend(params)
            else:
                groups["experts"].extend(p for p in module.parameters() if p.requires_grad)
        return {name: params for name, params in groups.items() if params}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts of the wrapped model (shared modules included), counted as
        ``peft.PeftModel.get_nb_trainable_parameters`` counts: each parameter once (tied ones too); a parameter
        that DeepSpeed ZeRO-3 has partitioned (empty, ``ds_numel`` set) counts ``ds_numel``; a bitsandbytes 4-bit
        parameter (``Params4bit``, two values per byte of its storage) counts ``numel * 2 * bytes per element``."""
        trainable = total = 0
        for _, param in self.named_parameters():
            n = param.numel()
            if n == 0 and hasattr(param, "ds_numel"):
                n = param.ds_numel
            if param.__class__.__name__ == "Params4bit":
                if hasattr(param, "element_size"):
                    n_bytes = param.element_size()
                elif not hasattr(param, "quant_storage"):
                    n_bytes = 1
                else:
                    n_bytes = param.quant_storage.itemsize
                n = n * 2 * n_bytes
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def count_parameters(self) -> tuple[int, int]:
        """Same as :meth:`get_nb_trainable_parameters` (the name the MLflow params use)."""
        return self.get_nb_trainable_parameters()

    def print_trainable_parameters(self) -> str:
        """Print and return PEFT's one-line summary of :meth:`get_nb_trainable_parameters`:
        ``trainable params: ... || all params: ... || trainable%: ...`` (PEFT's format; PEFT returns None)."""
        trainable, total = self.get_nb_trainable_parameters()
        line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"
        print(line)
        return line

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        layers = list(self.moa_layers().values())
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def moa_state_dict(self) -> dict[str, Tensor]:
        """Everything MoA adds (pools, routers, shared modules), keyed by module path; nothing of the base model."""
        state = {}
        for name, layer in self.moa_layers().items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base_layer."):
                    state[f"{name}.{key}"] = value
        for key, value in self.shared.state_dict().items():
            state[f"{SHARED_PREFIX}{key}"] = value
        for name in self.saved_modules():
            for key, value in self.model.get_submodule(name).state_dict().items():
                state[f"{SAVED_PREFIX}{name}.{key}"] = value
        return state

    def saved_modules(self) -> list[str]:
        """The base modules that train in full and are saved with the adapters (``MoAConfig.modules_to_save``)."""
        return find_modules_to_save(self.model, self.config.modules_to_save)

    # -- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
        """Write ``moa_config.json`` and ``moa_model.safetensors`` (no pickle), with their sha256 in
        ``moa_manifest.json``. The folder is replaced as a whole (:func:`moa.atomic.atomic_folder`): a kill at any
        moment leaves the old save or the new one; other files in it (a tokenizer) are kept.

        The config records where the base model comes from (``base_model_name_or_path``, by default the folder or
        name it was loaded from with ``from_pretrained``), its class and its labels (``id2label``: a classifier
        built with ``num_labels=3`` on a folder that has none), so :func:`load` can rebuild it.
        """
        directory = Path(directory)
        base_config = getattr(self.model, "config", None)
        meta = {
            "format": "moa",
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "layers": sorted(self.moa_layers()),
            "base_model_type": getattr(base_config, "model_type", None),
            "base_model_class": type(self.model).__name__,
            "base_model_name_or_path": base_model_name_or_path or getattr(base_config, "_name_or_path", None) or None,
            "base_model_config": base_config_overrides(base_config),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.moa_state_dict().items()}
        with atomic_folder(directory, keep_others=True) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        return directory

    def save_base(self, directory: str | os.PathLike) -> Path:
        """The base model without the MoA layers, with its own ``save_pretrained`` (safetensors): a folder
        ``from_pretrained`` reads, for shipping the base next to the adapters. The MoA layers are swapped out
        only while it is written."""
        layers = self.moa_layers()
        for name, layer in layers.items():
            _set_submodule(self.model, name, layer.base_layer)
        try:
            self.model.save_pretrained(str(directory), safe_serialization=True)
        finally:
            for name, layer in layers.items():
                _set_submodule(self.model, name, layer)
        return Path(directory)

    # -- merging and unloading -----------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Remove the MoA layers without merging: the base model as it was before :func:`attach`."""
        for name, layer in self.moa_layers().items():
            _set_submodule(self.model, name, layer.base_layer)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._base_requires_grad.get(name, param.requires_grad))
        return self.model

    @torch.no_grad()
    def merge(self, route: int | Sequence[float] | Tensor) -> nn.Module:
        """Fold a fixed route into the base weights, remove the MoA layers and return the plain model.

        ``route`` is one expert index, or one weight per expert (a fixed mixture). Like PEFT's
        ``merge_and_unload``, this modifies the wrapped model in place; this MoAModel is unusable afterwards.
        """
        layers = self.moa_layers()
        check_output_mixture(self)
        mixture = route_to_mixture(route, self.config.n_experts)
        for name, layer in layers.items():
            base = layer.base_layer
            merged = layer.merged_weight(mixture)
            base.weight.copy_(merged.t() if isinstance(base, Conv1D) else merged)
        return self.unload()


def check_output_mixture(moa_model: "MoAModel") -> None:
    """Refuse to fold a fixed expert mixture for routers whose computation is not a mixture of expert outputs."""
    router = next(iter(moa_model.moa_layers().values())).router
    if not router.mixes_expert_outputs:
        raise UserError(
            f"router {router.name!r} mixes expert parameters, not expert outputs: a fixed route over the pool's "
            "experts is not what it computes, so it cannot be merged or exported this way (one task's adapter "
            "exports with moa.to_peft(model, folder, task=t))"
        )


def route_to_mixture(route: int | Sequence[float] | Tensor, n_experts: int) -> Tensor:
    """An expert index or a per-expert weight vector, as a ``[E]`` mixture."""
    if isinstance(route, Tensor) and route.dim() == 0 and not route.is_floating_point():
        route = int(route)
    if isinstance(route, numbers.Integral) and not isinstance(route, bool):
        route = int(route)
        if not 0 <= route < n_experts:
            raise UserError(f"expert index {route} out of range for a pool of {n_experts} experts")
        return torch.nn.functional.one_hot(torch.tensor(route), n_experts).float()
    mixture = torch.as_tensor(route, dtype=torch.float32).flatten()
    if mixture.numel() != n_experts:
        raise UserError(f"a fixed route needs one weight per expert ({n_experts}), got {mixture.numel()}")
    return mixture


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = _PEFT_TARGETS.get(model_type) or _FALLBACK_TARGETS.get(model_type)
    if not targets:
        raise UserError(
            f"no default target_modules for model type {model_type!r}; pass MoAConfig(target_modules=[...])"
        )
    return list(targets)


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: list[str] | str | None) -> list[str]:
    """Names of the linear layers of ``model`` that ``targets`` selects (errors name the problem)."""
    if targets is None:
        targets = default_targets(model)
    found = []
    for name, module in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, MoALinear):
            raise UserError(f"module {name!r} already carries MoA layers; attach once per model")
        if not _is_linear(module):
            if isinstance(targets, str) or any(name == t for t in targets):
                raise UserError(f"target module {name!r} is a {type(module).__name__}; MoA adapts linear layers only")
            continue
        found.append(name)
    if not found:
        linears = [n for n, m in model.named_modules() if _is_linear(m)]
        raise UserError(
            f"no linear layer matches target_modules={targets!r}; linear layers of this model include "
            f"{sorted({n.rsplit('.', 1)[-1] for n in linears})[:20]} (e.g. {linears[:3]})"
        )
    return found


def find_modules_to_save(model: nn.Module, names: list[str] | None, targets: Sequence[str] = ()) -> list[str]:
    """The modules ``modules_to_save`` selects (outermost matches only); errors name what does not fit."""
    if not names:
        return []
    found = []
    for name, module in model.named_modules():
        if name and _matches(name, names) and not any(name.startswith(f + ".") for f in found):
            if name in targets or isinstance(module, MoALinear) or any(t.startswith(name + ".") for t in targets):
                raise UserError(f"module {name!r} is both adapted (target_modules) and in modules_to_save")
            found.append(name)
    if not found:
        raise UserError(f"no module matches modules_to_save={names!r}")
    return found


def attach(model: nn.Module, config: MoAConfig, *, layers: list[str] | None = None) -> MoAModel:
    """Freeze ``model`` and replace each target linear layer by a :class:`MoALinear`; returns the wrapper.

    The model is modified in place (like ``peft.get_peft_model``), all or nothing: if any layer cannot be built,
    the model is left as it was (its modules and ``requires_grad`` flags).
    """
    if isinstance(model, MoAModel) or any(isinstance(m, MoALinear) for m in model.modules()):
        raise UserError("this model already carries MoA layers; attach once per model")
    names = find_targets(model, config.target_modules) if layers is None else layers
    for name in names:  # every target exists and is a linear layer, before anything changes
        if not _has_submodule(model, name):
            raise UserError(f"the model has no module {name!r}")
        linear_shape(model.get_submodule(name))
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    bases = {name: model.get_submodule(name) for name in names}
    try:
        for param, _ in flags:  # frozen before building, so the new modules alone are trainable
            param.requires_grad_(False)
        slot, shared = ContextSlot(), nn.ModuleDict()
        built = {name: _build_layer(base, config, name, names, slot, shared) for name, base in bases.items()}
        to_save = find_modules_to_save(model, config.modules_to_save, names)
        for name, layer in built.items():
            _set_submodule(model, name, layer)
        for name in to_save:
            model.get_submodule(name).requires_grad_(True)
        shared.train(model.training)
        for module in shared.values():  # shared modules with per-call state (HypeLoRA's factors) follow the calls
            if hasattr(module, "bind_context"):
                module.bind_context(slot)
        return MoAModel(model, config, slot, requires_grad, shared)
    except BaseException:
        for name, base in bases.items():
            _set_submodule(model, name, base)
        for param, flag in flags:
            param.requires_grad_(flag)
        raise


def _build_layer(
    base: nn.Module, config: MoAConfig, name: str, names: list[str], slot: ContextSlot, shared: nn.ModuleDict
) -> MoALinear:
    d_in, d_out = linear_shape(base)
    weight = base.weight
    router = build_router(config.router, d_in, config.n_experts, config.top_k, **config.router_options)
    router.to(device=weight.device)
    spec = PoolSpec(
        d_in, d_out, config.n_experts, config.r, config.alpha, config.dropout, config.impl,
        dtype=weight.dtype, device=weight.device, name=name, all_names=tuple(names),
        options=dict(config.expert_options),
    )
    pool = router.build_pool(config.expert_kind, spec, shared)
    return MoALinear(base, pool, router, slot).train(base.training)  # new modules follow the model's mode


def load(directory: str | os.PathLike, base_model: nn.Module | None = None) -> MoAModel:
    """Re-attach the MoA layers saved in ``directory`` to a fresh copy of their base model.

    Without ``base_model``, the base is loaded with ``from_pretrained`` from the path recorded at save time (see
    :meth:`MoAModel.save_pretrained`; a relative path is first looked up next to ``directory``), with the class
    and labels it had.
    """
    meta, state, source = read_save(directory)
    config = MoAConfig.from_dict(meta["config"])
    if base_model is None:
        base_model = load_recorded_base(meta, source.parent / CONFIG_NAME)
    missing = [name for name in meta["layers"] if not _has_submodule(base_model, name)]
    if missing:
        raise UserError(f"the base model has no modules {missing[:5]}: it is not the model these MoA layers were saved from")
    moa_model = attach(base_model, config, layers=meta["layers"])
    try:
        load_moa_state(moa_model, state, source=str(source))
    except BaseException:
        moa_model.unload()  # leave the caller's model as it was
        raise
    return moa_model


def load_saved_state(moa_model: MoAModel, directory: str | os.PathLike) -> None:
    """Load the adapters saved in ``directory`` (:meth:`MoAModel.save_pretrained`) into ``moa_model`` in place,
    e.g. to resume training; a save of another configuration or of other layers is refused by name."""
    meta, state, source = read_save(directory)
    saved, own = meta["config"], json.loads(json.dumps(moa_model.config.to_dict()))  # as saved: tuples as lists
    differ = sorted(k for k in set(saved) | set(own) if saved.get(k) != own.get(k))
    if differ or meta["layers"] != sorted(moa_model.moa_layers()):
        raise UserError(f"{source.parent} holds adapters of another configuration (differs in "
                        f"{differ or ['the adapted layers']}); attach the MoAConfig it was saved with")
    load_moa_state(moa_model, state, source=str(source))


def read_save(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor], Path]:
    """``(meta, tensors, weights path)`` of a :meth:`MoAModel.save_pretrained` folder, checked against its manifest."""
    directory = readable(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a saved MoA model")
    verify(directory, [CONFIG_NAME, WEIGHTS_NAME])  # sha256 of each file recorded at save (older saves: none)
    meta = read_json(config_path)
    if meta.get("format") != "moa" or meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{config_path} is not a MoA config this version can read (format {meta.get('format_version')})")
    return meta, read_safetensors(weights_path), weights_path


# Base config fields a saved model records because ``from_pretrained`` of the base folder would not give them back:
# the labels (a classifier built with ``num_labels=3`` on a folder that has none) and the classification loss.
BASE_CONFIG_FIELDS = ("id2label", "label2id", "problem_type")


def base_config_overrides(base_config: Any) -> dict[str, Any]:
    """The :data:`BASE_CONFIG_FIELDS` of a base model's config that are set, as JSON (``id2label`` keys are strings)."""
    values = {name: getattr(base_config, name, None) for name in BASE_CONFIG_FIELDS}
    if values["id2label"] is not None:
        values["id2label"] = {str(k): v for k, v in values["id2label"].items()}
    return {name: value for name, value in values.items() if value is not None}


def load_recorded_base(meta: dict[str, Any], config_path: Path) -> nn.Module:
    """The base model named in a saved config (``base_model_name_or_path``, ``base_model_class``), with the labels
    recorded in ``base_model_config``."""
    import transformers

    path = meta.get("base_model_name_or_path")
    if not path:
        raise UserError(f"{config_path} records no base model path (it was built from a config, not loaded with "
                         "from_pretrained): pass the base model, moa.load(folder, base_model)")
    beside = config_path.parent / path  # a relative path names a folder next to the save first (a bundle's base)
    if not Path(path).is_absolute() and beside.is_dir():
        path = str(beside)
    elif is_pretrained_name(path) or Path(path).suffix.lower() == ".gguf":  # "smollm2-135m", a GGUF: its folder
        path = str(resolve_pretrained(beside if beside.is_file() else path))
    cls = getattr(transformers, meta.get("base_model_class") or "", None)
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        cls = transformers.AutoModel
    overrides = dict(meta.get("base_model_config") or {})
    if "id2label" in overrides:
        overrides["id2label"] = {int(k): v for k, v in overrides["id2label"].items()}
    try:
        return cls.from_pretrained(path, **overrides)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the base model {path!r} recorded in {config_path}: {error}; pass the base "
                         "model, moa.load(folder, base_model)") from error


def load_moa_state(moa_model: MoAModel, state: dict[str, Tensor], source: str = "state dict") -> None:
    expected = moa_model.moa_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    with torch.no_grad():
        shared = {k[len(SHARED_PREFIX):]: v for k, v in state.items() if k.startswith(SHARED_PREFIX)}
        moa_model.shared.load_state_dict(shared, strict=True)
        for name in moa_model.saved_modules():
            prefix = f"{SAVED_PREFIX}{name}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            moa_model.model.get_submodule(name).load_state_dict(own, strict=True)
        for name, layer in moa_model.moa_layers().items():
            prefix = f"{name}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            layer.load_state_dict(own, strict=False)


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
