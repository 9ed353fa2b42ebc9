"""Rebuild any saved recommender: :func:`load_recommender` (text models and X-Cross models alike).

A saved folder (:mod:`moa.recsys.persistence`) names the kind of its item encoder (``describe()["kind"]``);
:data:`ITEM_ENCODER_BUILDERS` maps each kind to the function that rebuilds that item encoder from the backbone,
the :class:`~moa.recsys.recommender.RecommenderConfig`, the domains and the saved description. This module sits
above both the recommender and X-Cross (it imports them; neither imports it), so loading needs no lazy import.
"""

from __future__ import annotations

import os
from typing import Callable

from torch import nn

from moa.atomic import read_safetensors
from moa.experts.errors import UserError

from .encoders import ItemEncoder, load_encoder
from .persistence import included_encoder, open_saved
from .recommender import RecommenderConfig, TextSeqRecommender
from .xcross import XCrossItemEncoder


def build_text_item_encoder(backbone: nn.Module, config: RecommenderConfig, domains: list[str],
                            description: dict) -> ItemEncoder:
    """The item encoder of a text recommender: one expert per domain (or the saved count), none when frozen."""
    return ItemEncoder(backbone, description["n_experts"] or len(domains), config.adapted_layers, config.r,
                       config.alpha, config.target_modules, config.impl, expert_names=domains)


def build_xcross_item_encoder(backbone: nn.Module, config: RecommenderConfig, domains: list[str],
                              description: dict) -> ItemEncoder:
    """The item encoder of an X-Cross recommender: the saved sources, ``beta`` and ``gamma``."""
    return XCrossItemEncoder(backbone, description["sources"], config.adapted_layers, config.r, config.alpha,
                             config.target_modules, config.impl, description["beta"], description["gamma"])


ITEM_ENCODER_BUILDERS: dict[str, Callable[[nn.Module, RecommenderConfig, list[str], dict], ItemEncoder]] = {
    "text": build_text_item_encoder,
    "xcross": build_xcross_item_encoder,
}
"""``kind -> builder(backbone, config, domains, description)`` used by :func:`load_recommender`."""


def load_recommender(directory: str | os.PathLike, backbone: nn.Module | None = None) -> TextSeqRecommender:
    """Rebuild a recommender written by :meth:`TextSeqRecommender.save` (X-Cross models too).

    The pretrained encoder comes from the saved weights when they were included, else from ``backbone`` or the
    saved ``config.encoder`` path (default: the installed all-MiniLM-L6-v2).
    """
    config_path, weights_path, meta = open_saved(directory)
    config = RecommenderConfig.from_dict(meta["config"])
    tensors = read_safetensors(weights_path)
    if backbone is None:
        if meta["encoder_included"]:
            backbone = included_encoder(meta, tensors)
        else:
            backbone, _ = load_encoder(config.encoder)
    kind = meta["item_encoder"]["kind"]
    try:
        build = ITEM_ENCODER_BUILDERS[kind]
    except KeyError:
        raise UserError(f"unknown item encoder kind {kind!r} in {config_path}; "
                         f"known: {sorted(ITEM_ENCODER_BUILDERS)}") from None
    model = TextSeqRecommender(build(backbone.eval(), config, meta["domains"], meta["item_encoder"]), meta["domains"],
                               config)
    model.load_weights({k: v for k, v in tensors.items() if not k.startswith("encoder.")})
    model.eval()
    return model
