"""Serving bundles of every model kind behind one interface.

A bundle is a folder of plain files with a ``service.json`` naming its ``kind``; each kind has one service class
(its serving flavour) with ``from_bundle(folder)``, ``predict(frame, params)`` and a default gate ``GATE``
(metric, direction):

=============  ================================================  ======================
kind           service                                           default gate
=============  ================================================  ======================
recommender    :class:`moa.pipelines.kinds.recommender.service.RecommendationService`  ``val/ndcg_10``, max
classifier     :class:`moa.pipelines.kinds.text_bundle.ClassifierService`  ``val/accuracy``, max
causal-lm      :class:`moa.pipelines.kinds.text_bundle.GenerationService`  ``val/loss``, min
=============  ================================================  ======================

:class:`moa.pipelines.tracking.callbacks.LogBundle` (a fit callback) writes, logs and registers a bundle at the end of fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from moa.atomic import read_json, readable
from moa.experts.errors import UserError

SERVICE_FILE = "service.json"
KINDS = ("recommender", "classifier", "causal-lm")


class RequestError(UserError):
    """A request a service refuses (unknown names or ids, bad settings, ...); the message names the row and the
    problem. Served, it is a 400."""


def bundle_meta(directory: str | Path) -> dict[str, Any]:
    """The bundle's ``service.json`` (a recommender bundle written before kinds existed has no ``kind``)."""
    path = Path(directory) / SERVICE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a moa bundle: {SERVICE_FILE} missing")
    meta = read_json(path)
    meta.setdefault("kind", "recommender")
    if meta["kind"] not in KINDS:
        raise UserError(f"{path}: unknown model kind {meta['kind']!r}; moa serves {list(KINDS)}")
    return meta


def service_class(kind: str):
    if kind == "recommender":
        from moa.pipelines.kinds.recommender.service import RecommendationService

        return RecommendationService
    from moa.pipelines.kinds.text_bundle import ClassifierService, GenerationService

    return {"classifier": ClassifierService, "causal-lm": GenerationService}[kind]


def load_service(directory: str | Path):
    """The service of any bundle (files checked against their manifest)."""
    directory = readable(directory)
    return service_class(bundle_meta(directory)["kind"]).from_bundle(directory)


def signature_and_example(directory: str | Path) -> tuple[Any, Any]:
    """The MLflow signature and an input example (a frame, or a frame and params) of a bundle, by kind."""
    meta = bundle_meta(directory)
    if meta["kind"] == "recommender":
        from moa.pipelines.kinds.recommender.service import input_example, signature

        return signature(meta), (input_example(directory), {"k": 5})
    from moa.pipelines.kinds.text_bundle import input_example, signature

    return signature(meta), input_example(meta)


def default_gate(kind: str) -> tuple[str, str]:
    return service_class(kind).GATE
