"""Serving bundles of every model kind behind one interface, and the registry of model kinds.

A bundle is a folder of plain files with a ``service.json`` naming its ``kind``. A kind is a :class:`ModelKind`
registered by name (:func:`register_kind`, as PEFT registers its methods): its serving flavour (a service class
with ``from_bundle(folder)`` and ``predict(frame, params)``), its default gate (metric, direction), its MLflow
signature and input example, its LightningModules (whose ``write_bundle`` writes the bundle, ``bundle_kind``
names the kind) and, optionally, what ``moa batch`` without ``--input`` scores (``score_all``).

Bundles, ``moa register``, ``moa serve`` and ``moa batch`` look a kind up by the name in ``service.json``
(:func:`get_kind`); this module imports no kind by name. On the first lookup of a name it does not know it imports,
once, the modules that register kinds: moa's own (:data:`BUILTIN_KINDS`), the Python entry points of group
``moa.kinds``, and the modules named in the environment variable ``MOA_KINDS`` (comma-separated, importable from
the working directory). Never a module a bundle names: loading a bundle runs no code of its own.

=============  =============================================================  ======================
kind           service                                                        default gate
=============  =============================================================  ======================
recommender    :class:`moa.pipelines.kinds.recommender.service.RecommendationService`  ``val/ndcg_10``, max
classifier     :class:`moa.pipelines.kinds.classifier.service.ClassifierService`       ``val/accuracy``, max
causal-lm      :class:`moa.pipelines.kinds.causal_lm.service.GenerationService`        ``val/loss``, min
=============  =============================================================  ======================

:class:`moa.pipelines.tracking.log_bundle.LogBundle` (a fit callback) writes, logs and registers a bundle at the end
of fit.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from moa.atomic import read_json, readable
from moa.experts.errors import UserError

SERVICE_FILE = "service.json"
ENTRY_POINT_GROUP, ENV_VAR = "moa.kinds", "MOA_KINDS"
# moa's own kinds: each subpackage registers its kind when imported
BUILTIN_KINDS = ("moa.pipelines.kinds.recommender", "moa.pipelines.kinds.classifier", "moa.pipelines.kinds.causal_lm")


class RequestError(UserError):
    """A request a service refuses (unknown names or ids, bad settings, ...); the message names the row and the
    problem. Served, it is a 400."""


def unread_columns(columns, signature=None, names: Mapping[str, Any] | None = None) -> list[str]:
    """Of ``columns``, in their order, those a model does not read, for every kind: those its MLflow ``signature``
    does not name (none when it names no inputs), and ``task`` / ``domain`` when ``names`` (the logged model's
    metadata or its service's meta) lists only the placeholder ``default`` as its tasks / domains (a model trained
    without them). Every way in ignores them and names them once (see :mod:`moa.pipelines.serving.scoring`)."""
    from moa.pipelines.data.text import DEFAULT

    schema = getattr(signature, "inputs", None)
    read = set(schema.input_names()) if schema is not None and schema.has_input_names() else None
    placeholder = {c for c in ("task", "domain") if list((names or {}).get(f"{c}s") or ()) == [DEFAULT]}
    return [c for c in columns if (read is not None and c not in read) or c in placeholder]


def ignored_note(ignored) -> str:
    """The one line that names the ignored columns (``moa batch``'s stderr, the pyfunc model's log)."""
    return f"ignored the columns {list(ignored)}: the model does not read them"


@dataclass(frozen=True)
class ModelKind:
    """A model kind: what moa needs to log, register, serve and batch-score its bundles.

    Args:
        name: the ``kind`` its bundles' ``service.json`` names.
        service: the serving flavour: ``service.from_bundle(folder)`` -> an object with
            ``predict(frame, params) -> DataFrame`` (raising :class:`RequestError` for a bad request).
        gate: the default ``(metric, "max" | "min")`` a registered version is promoted on.
        signature: ``signature(meta)`` -> the MLflow ``ModelSignature`` of a bundle (``meta``: its service.json).
        input_example: ``input_example(folder)`` -> a DataFrame, or ``(DataFrame, params)``.
        modules: the class paths of its LightningModules (what a config's ``class_path`` names).
        score_all: for ``moa batch`` without ``--input``: ``score_all(model, params, data=..., data_name=...)``
            -> the answers' DataFrame (``model``: the loaded MLflow pyfunc model); ``None``: ``--input`` needed.
    """

    name: str
    service: type
    gate: tuple[str, str]
    signature: Callable[[Mapping[str, Any]], Any]
    input_example: Callable[[Path], Any]
    modules: tuple[str, ...] = ()
    score_all: Callable[..., Any] | None = field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise UserError(f"a model kind needs a non-empty name, got {self.name!r}")
        if not callable(getattr(self.service, "from_bundle", None)):
            raise UserError(f"kind {self.name!r}: the service {self.service!r} has no from_bundle(folder)")
        if len(self.gate) != 2 or self.gate[1] not in ("max", "min"):
            raise UserError(f"kind {self.name!r}: gate must be (metric, 'max' | 'min'), got {self.gate!r}")


_KINDS: dict[str, ModelKind] = {}
_lock = threading.RLock()
_discovered = False


def register_kind(kind: ModelKind) -> ModelKind:
    """Register ``kind`` under its name (again with the same definition is a no-op; another under a taken name
    is an error)."""
    if not isinstance(kind, ModelKind):
        raise UserError(f"register_kind takes a moa.pipelines.bundle.ModelKind, got {type(kind).__name__}")
    with _lock:
        known = _KINDS.get(kind.name)
        if known is not None and known != kind:
            raise UserError(f"model kind {kind.name!r} is already registered (service {known.service.__qualname__})")
        _KINDS[kind.name] = kind
    return kind


def _discover() -> None:
    """Import the kinds' modules once: moa's own, entry points of group ``moa.kinds``, then ``$MOA_KINDS``."""
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True
        for module in BUILTIN_KINDS:
            importlib.import_module(module)
        from importlib.metadata import entry_points

        for point in entry_points(group=ENTRY_POINT_GROUP):
            loaded = point.load()
            if isinstance(loaded, ModelKind):
                register_kind(loaded)
        names = [name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip()]
        if names and "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # the user's module next to their config (after everything else)
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as error:
                raise UserError(f"{ENV_VAR}={os.environ[ENV_VAR]}: cannot import {name!r}: {error}") from error


def registered_kinds() -> dict[str, ModelKind]:
    """Every known kind by name (after importing the kinds' modules)."""
    _discover()
    return dict(_KINDS)


def get_kind(name: str) -> ModelKind:
    """The kind registered as ``name``; a :class:`UserError` naming the known ones when there is none."""
    if name not in _KINDS:
        _discover()
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown model kind {name!r}; known kinds: {sorted(_KINDS)} (plug one in with "
                        f"register_kind in a module named by an entry point of group {ENTRY_POINT_GROUP!r} "
                        f"or by ${ENV_VAR})") from None


def bundle_meta(directory: str | Path) -> dict[str, Any]:
    """The bundle's ``service.json`` (a recommender bundle written before kinds existed has no ``kind``); its kind
    must be registered."""
    path = Path(directory) / SERVICE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a moa bundle: {SERVICE_FILE} missing")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not a JSON object")
    meta.setdefault("kind", "recommender")
    try:
        get_kind(meta["kind"])
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    return meta


def load_service(directory: str | Path):
    """The service of any bundle (files checked against their manifest)."""
    directory = readable(directory)
    return get_kind(bundle_meta(directory)["kind"]).service.from_bundle(directory)


def signature_and_example(directory: str | Path) -> tuple[Any, Any]:
    """The MLflow signature and an input example (a frame, or a frame and params) of a bundle, by kind."""
    meta = bundle_meta(directory)
    kind = get_kind(meta["kind"])
    return kind.signature(meta), kind.input_example(Path(directory))


def default_gate(kind: str) -> tuple[str, str]:
    """The kind's ``(metric, mode)``."""
    return tuple(get_kind(kind).gate)
