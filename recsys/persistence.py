"""The folder a recommender is saved in: ``recommender.json`` + ``recommender.safetensors`` (no pickle).

* :func:`save_recommender` (the recommender's ``save``): catalogue token ids, adapters, user encoders (and the
  pretrained encoder's weights when it has no path) in one safetensors file, the configuration and the item
  encoder's description in the JSON file, their sha256 in ``moa_manifest.json``; written as one folder swapped in
  whole (:func:`moa.atomic.atomic_folder`).
* :func:`load_weights` (the recommender's ``load_weights``): the inverse, into an identically built recommender.
* :func:`open_saved` / :func:`included_encoder`: the reading half (checks, sha256, format version; the saved
  pretrained encoder), for :func:`moa.recsys.loading.load_recommender`, which rebuilds the model of the right kind.

This module knows the file format, not the model classes (the recommender imports it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from safetensors.torch import save_file
from torch import Tensor, nn

from moa.atomic import atomic_folder, read_json, readable, verify
from moa.experts.errors import UserError

from .encoders import is_minilm, plain_copy

if TYPE_CHECKING:  # annotations only (the recommender imports this module)
    from .recommender import TextSeqRecommender

FORMAT = "moa-recsys"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "recommender.json", "recommender.safetensors"


def save_recommender(model: TextSeqRecommender, directory: str | os.PathLike, *,
                     include_encoder: bool | None = None) -> Path:
    """Write ``recommender.json`` and ``recommender.safetensors`` (catalogue token ids, adapters, user encoders)
    with their sha256 in ``moa_manifest.json``, as one folder swapped in whole (:func:`moa.atomic.atomic_folder`).

    The pretrained encoder's weights are referenced by ``config.encoder`` (a path) and not copied, unless
    ``include_encoder`` (default: only when the encoder has no path, e.g. built from a config).
    """
    directory = Path(directory)
    backbone = model.item_encoder.backbone
    if include_encoder is None:
        include_encoder = model.config.encoder is None and not is_minilm(backbone)
    tensors: dict[str, Tensor] = {}
    for name, (ids, mask) in model.item_encoder.catalogues.items():
        tensors[f"catalogue.{name}.input_ids"] = ids
        tensors[f"catalogue.{name}.attention_mask"] = mask
    for key, value in model.item_encoder.adapter_state().items():
        tensors[f"adapters.{key}"] = value
    for key, value in model.heads.state_dict().items():
        tensors[f"heads.{key}"] = value
    if include_encoder:
        for key, value in plain_copy(backbone).state_dict().items():
            tensors[f"encoder.{key}"] = value
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "class": type(model).__name__,
        "config": asdict(model.config), "domains": model.domains, "item_encoder": model.item_encoder.describe(),
        "encoder_config": backbone.config.to_dict(), "encoder_included": bool(include_encoder),
        "catalogues": sorted(model.item_encoder.catalogues),
    }
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    with atomic_folder(directory, keep_others=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_weights(model: TextSeqRecommender, tensors: Mapping[str, Tensor]) -> None:
    """Load what :func:`save_recommender` wrote into this (identically built) recommender."""
    catalogues: dict[str, dict[str, Tensor]] = {}
    adapters, heads = {}, {}
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        if group == "catalogue":
            name, _, field_name = rest.rpartition(".")
            catalogues.setdefault(name, {})[field_name] = value
        elif group == "adapters":
            adapters[rest] = value
        elif group == "heads":
            heads[rest] = value
    for name, parts in catalogues.items():
        model.add_catalogue(name, parts["input_ids"], parts["attention_mask"])
    model.item_encoder.load_adapter_state(adapters)
    model.heads.load_state_dict(heads, strict=True)
    model.clear_cache()


def open_saved(directory: str | os.PathLike) -> tuple[Path, Path, dict[str, Any]]:
    """``(config path, weights path, meta)`` of a saved recommender, after checking both files are there, their
    sha256 (folders saved before the manifest: none) and that this version can read the format."""
    directory = readable(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a saved recommender")
    verify(directory, [CONFIG_FILE, WEIGHTS_FILE])  # sha256 recorded at save (folders saved before: none)
    meta = read_json(config_path)
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{config_path} is not a recommender this version can read")
    return config_path, weights_path, meta


def included_encoder(meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> nn.Module:
    """The pretrained encoder saved with the recommender (``encoder_included``), rebuilt from its config."""
    from transformers import CONFIG_MAPPING, AutoModel

    encoder_config = dict(meta["encoder_config"])
    backbone = AutoModel.from_config(CONFIG_MAPPING[encoder_config["model_type"]].from_dict(encoder_config))
    state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    backbone.load_state_dict(state, strict=True)
    return backbone
