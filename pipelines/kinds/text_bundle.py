"""The bundle of the text model kinds, shared by them: a classifier (:mod:`moa.pipelines.kinds.classifier`) or a
causal LM (:mod:`moa.pipelines.kinds.causal_lm`) as a folder of plain files, its writing and loading, the base of
their services (:class:`TextService`: a row's task and domain names, the prompt template) and of their MLflow
signature and input example. What differs by kind comes from the module (``text_bundle_meta``, ``head``,
``random_backbones``, ``default_tokenizer``) and the kind's service (``KIND``, ``BASE_FALLBACK``, ``from_bundle``).

A text bundle is a folder (no pickle; no absolute path but a referenced base's)::

    service.json        kind ("classifier" | "causal-lm"), task / domain / label names, the prompt template and
                        lengths of the training data, the head's shape, the gating metrics, the moa version
    adapter/            the MoA layers (:meth:`moa.MoAModel.save_pretrained`)
    head.safetensors    the classification head (classifiers)
    base/               the base model without adapters (``save_pretrained``), only when it is included (see below)
    tokenizer/          the tokenizer the data was encoded with
    moa_manifest.json   sha256 of every file, checked at load

The base is referenced by default, not copied (:func:`base_reference`): ``service.json`` records a name
(``"minilm"``, ``"smollm2-135m"``: :mod:`moa.pretrained`), a GGUF file or a model folder, with the sha256 of the
GGUF file or of the folder's ``config.json`` (a different model found there at load is named, and so is a missing
one). A backbone built from a random config (``tiny-bert``, ``tiny-llama``, ``tiny-gpt2``) cannot be referenced:
its weights are included in ``base/``, as they are for every backbone with ``base="include"``.

Requests are rows of names: a classifier takes ``{text, task, domain}`` and answers ``label``, ``probability``,
``labels`` and ``probabilities`` (the row's task's label set); a causal LM takes ``{prompt, task, domain,
max_new_tokens, temperature, top_p}`` and answers ``text``. ``task`` / ``domain`` may be left out when the model
knows one. Rows of different tasks and domains run as one batch: routing is per row, through the grouped kernels
(generation too: one ``generate`` call, per-row budgets and sampling settings).

The services may be called from several threads at once (the scoring server does): they take turns on the model
one forward call at a time, each with its own request's routing, so a long generation lets a short request's
decode steps in between its own. ``predict(frame, params, check=...)`` calls ``check()`` after every decode step;
an exception it raises (the server's deadline) stops the generation there.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import moa
from moa.atomic import atomic_folder, read_json, readable, sha256, verify
from moa.experts.errors import UserError, UserTypeError
from moa.pipelines.bundle import RequestError
from moa.pretrained import is_pretrained_name, minilm_dir, resolve_pretrained, smollm2_gguf
from moa.pipelines.data.text import TextEncoder

BASE_MODES = ("reference", "include")  # a bundle's base: recorded by name / path, or its weights copied in
SERVICE_FILE, ADAPTER_DIR, BASE_DIR, TOKENIZER_DIR, HEAD_FILE, CONFIG_FILE = (
    "service.json", "adapter", "base", "tokenizer", "head.safetensors", "config.yaml")
CLASSIFIER, CAUSAL_LM = "classifier", "causal-lm"
MAX_TEXT_CHARS = 100_000  # per row, before tokenization (which truncates to the training length)


# ---------------------------------------------------------------------------------------------------- writing
def metric_name(name: str) -> str:
    """A task or label name as a metric-name part: MLflow keeps ``[A-Za-z0-9_.- ]`` (and ``/``, which would nest)."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(name))


def write_text_bundle_of(module, directory, datamodule=None, *, metrics=None, base: str = "reference"):
    """The module's serving bundle (:func:`moa.pipelines.kinds.text_bundle.write_text_bundle`); what
    :class:`moa.pipelines.tracking.log_bundle.LogBundle` calls at the end of fit."""
    return write_text_bundle(directory, module, datamodule, metrics=metrics, base=base)


def write_text_bundle(directory: str | Path, module, datamodule=None, *, metrics: Mapping[str, float] | None = None,
                      base: str = "reference", config_yaml: str | Path | None = None) -> Path:
    """Write the bundle of a trained :class:`MoAClassifier` or :class:`MoACausalLM` (``datamodule``: the
    :class:`~moa.pipelines.data.text.TextData` it was trained on, for the tokenizer, names, template and lengths).

    ``base="reference"`` (the default) records the backbone (:func:`base_reference`: a pretrained name, a GGUF
    file or a model folder, with its checksum) instead of copying its weights; a backbone built from a random
    config is included all the same. ``base="include"`` ships the base's weights in ``base/``. The folder is
    replaced as a whole.
    """
    if base not in BASE_MODES:
        raise UserError(f"base must be 'reference' or 'include', got {base!r}")
    meta = _describe(module, datamodule)
    if base == "reference":
        options = (getattr(module, "hparams", None) or {}).get("backbone_options")
        meta.update(base_reference(getattr(module, "backbone", None), options, getattr(module, "random_backbones", ())))
    meta["metrics"] = {str(k): float(v) for k, v in (metrics or {}).items()}
    tokenizer = getattr(datamodule, "tokenizer", None) or getattr(module, "tokenizer", None)
    if tokenizer is None and callable(getattr(module, "default_tokenizer", None)):
        tokenizer = module.default_tokenizer()
    if tokenizer is None:
        raise UserError("a text bundle needs the tokenizer the model was trained with: pass the data module "
                         "(moa.pipelines.data.text.TextData)")
    head = getattr(module, "head", None)
    return write_bundle_files(directory, module.model, tokenizer, meta, head=head, config_yaml=config_yaml)


def write_bundle_files(directory: str | Path, model: moa.MoAModel, tokenizer, meta: Mapping[str, Any], *,
                       head: nn.Module | None = None, config_yaml: str | Path | None = None) -> Path:
    """The files of a text bundle from its parts (``meta``: the ``service.json``; the base's weights go into
    ``base/`` unless it names ``base_reference``: :func:`base_reference`). The folder is replaced as a whole
    (:func:`moa.atomic.atomic_folder`)."""
    reference = meta.get("base_reference")
    target = Path(directory)
    with atomic_folder(target) as tmp:
        # the adapters name their base relative to themselves (moa.load(bundle / "adapter") finds it)
        model.save_pretrained(tmp / ADAPTER_DIR, base_model_name_or_path=reference or f"../{BASE_DIR}")
        if not reference:
            model.save_base(tmp / BASE_DIR)
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp / HEAD_FILE))
        (tmp / SERVICE_FILE).write_text(json.dumps(dict(meta), indent=2))
        if config_yaml is not None:
            (tmp / CONFIG_FILE).write_bytes(Path(config_yaml).read_bytes())
    return target


def _describe(module, datamodule) -> dict[str, Any]:
    """The service.json of ``module``'s bundle: the data's template, lengths and names, and what the module says
    about itself (``module.text_bundle_meta(tasks, domains)``: its ``kind`` and the rest of its kind's meta)."""
    describe = getattr(module, "text_bundle_meta", None)
    if describe is None or getattr(module, "model", None) is None:
        raise UserTypeError(f"no text bundle for {type(module).__name__}: its module needs text_bundle_meta(tasks, "
                            "domains) and a MoA model (as MoAClassifier and MoACausalLM have)")
    template = getattr(datamodule, "prompt_template", "{text}")
    max_length = int(getattr(datamodule, "max_length", 128))
    tasks = list(getattr(datamodule, "task_names", None) or ["default"])
    domains = list(getattr(datamodule, "domain_names", None) or ["default"])
    meta: dict[str, Any] = {"format_version": 1, "moa_version": moa.__version__, "prompt_template": template,
                            "max_length": max_length, "base_class": type(module.model.model).__name__}
    meta.update(describe(tasks, domains))
    return meta


def base_reference(backbone: Any, options: Mapping[str, Any] | None = None, random_backbones=()) -> dict[str, Any]:
    """The ``service.json`` entries that reference the base instead of shipping it: ``base_reference`` (a name of
    :mod:`moa.pretrained`, else the absolute path of the GGUF file or model folder), ``base_sha256`` (of the GGUF
    file, else of the folder's ``config.json``: :func:`_identity_file`) and the ``from_pretrained`` options it
    was loaded with (``base_options``). ``{}`` for a backbone that cannot be referenced, which the bundle then
    includes: one built from a random config (``random_backbones``), a model object, options that are not JSON."""
    if not isinstance(backbone, (str, os.PathLike)) or str(backbone) in random_backbones:
        return {}
    try:
        options = json.loads(json.dumps(dict(options or {})))
    except (TypeError, ValueError):
        return {}
    reference = str(backbone) if is_pretrained_name(backbone) else str(Path(backbone).expanduser().resolve())
    meta = {"base_reference": reference, "base_sha256": sha256(_identity_file(reference))}
    return {**meta, "base_options": options} if options else meta


def _identity_file(reference: str) -> Path:
    """The file whose sha256 identifies a referenced base: its GGUF file, else its folder's ``config.json``; a
    :class:`UserError` naming the reference when it is not on this machine."""
    try:
        if is_pretrained_name(reference):
            source = smollm2_gguf() if reference == "smollm2-135m" else resolve_pretrained(reference)
        else:
            source = Path(reference)
        path = source if source.suffix.lower() == ".gguf" else source / "config.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist")
    except UserError as error:
        raise UserError(f"the base model {reference!r} is not on this machine ({error}): install or copy it there, "
                        "or write the bundle with base: include") from None
    return path


# ---------------------------------------------------------------------------------------------------- loading
def _load_base(folder: Path, meta: Mapping[str, Any], fallback: str) -> nn.Module:
    import transformers

    reference = meta.get("base_reference")
    source = folder / BASE_DIR if reference is None else _referenced_base(reference, meta.get("base_sha256"))
    fallback = getattr(transformers, fallback)
    cls = getattr(transformers, meta.get("base_class") or "", None)
    cls = cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else fallback
    try:
        return cls.from_pretrained(str(source), **dict(meta.get("base_options") or {}))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the bundle's base model from {source}: {error}") from error


def _referenced_base(reference: str, recorded: str | None) -> Path | str:
    """The folder ``from_pretrained`` reads for a referenced base, checked against the recorded sha256 (bundles
    of older moa record none, and may name a folder relative to the working directory)."""
    if recorded is None:
        return minilm_dir() if reference == "minilm" else reference
    path = _identity_file(reference)
    found = sha256(path)
    if found != recorded:
        raise UserError(f"the bundle's base {reference!r} is not the model it was written with: {path.name} has "
                        f"sha256 {found[:12]}..., the bundle recorded {recorded[:12]}...; put that model back, or "
                        "write the bundle with base: include")
    return resolve_pretrained(reference)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A text bundle's ``service.json``."""
    return read_json(Path(directory) / SERVICE_FILE)


def load_text_bundle(directory: str | Path, kind: str, base_fallback: str = "AutoModel"
                     ) -> tuple[dict[str, Any], moa.MoAModel, Any, Path]:
    """``(meta, moa_model, tokenizer, folder)`` of a bundle of ``kind``, every file checked against the manifest
    first (``base_fallback``: the transformers class that loads a base whose ``base_class`` it does not know)."""
    from transformers import AutoTokenizer

    folder = readable(directory)
    verify(folder)
    meta = read_meta(folder)
    if meta.get("kind") != kind:
        raise UserError(f"{folder / SERVICE_FILE}: not a {kind} bundle (kind {meta.get('kind')!r})")
    model = moa.load(folder / ADAPTER_DIR, _load_base(folder, meta, base_fallback)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    return meta, model, tokenizer, folder


# ---------------------------------------------------------------------------------------------------- services
class TextService:
    """Shared by the text kinds: the names -> ids of a row's task and domain, and the prompt template. A subclass
    names its ``KIND`` and ``BASE_FALLBACK`` and may load more of the bundle in ``from_bundle``."""

    KIND, BASE_FALLBACK = "", "AutoModel"
    text_column = "text"
    threadsafe = True  # callers may share the service between threads (see the module's docstring)

    def __init__(self, meta, model, tokenizer, head=None):
        self.meta, self.model, self.tokenizer, self.head = dict(meta), model, tokenizer, head
        self._model_lock = threading.Lock()  # one forward call at a time: the routing context is the model's
        self.tasks, self.domains = list(meta["tasks"]), list(meta["domains"])
        self._task_id = {name: i for i, name in enumerate(self.tasks)}
        self._domain_id = {name: i for i, name in enumerate(self.domains)}
        # the pre-processing of training (moa.pipelines.data.text.TextEncoder) with the bundle's tokenizer and lengths
        self.encoder = TextEncoder(tokenizer, meta["prompt_template"], int(meta["max_length"]),
                                   pad_token_id=meta.get("pad_token_id"), eos_token_id=meta.get("eos_token_id"))

    @classmethod
    def from_bundle(cls, directory: str | Path):
        meta, model, tokenizer, _ = load_text_bundle(directory, cls.KIND, cls.BASE_FALLBACK)
        return cls(meta, model, tokenizer)

    def predict(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None, *,
                check: Callable[[], None] | None = None) -> pd.DataFrame:
        """The served call (every kind's service has it); ``check()`` runs between decode steps (generation) and
        may raise to stop the work."""
        return self.predict_frame(frame, params, check=check)

    def _names(self, frame: pd.DataFrame, column: str, known: list[str], ids: dict[str, int]) -> list[int]:
        if column not in frame.columns:
            if len(known) == 1:
                return [0] * len(frame)
            raise RequestError(f"missing input column {column!r}: this model knows the {column}s {known}")
        out = []
        for row, name in enumerate(frame[column]):
            if missing(name) and len(known) == 1:
                out.append(0)
            elif isinstance(name, str) and name in ids:
                out.append(ids[name])
            else:
                raise RequestError(f"row {row}: unknown {column} {name!r}; this model knows {known}")
        return out

    def _prompts(self, frame: pd.DataFrame) -> tuple[list[str], Tensor, Tensor]:
        column = self.text_column
        if column not in frame.columns:
            raise RequestError(f"missing input column {column!r} (the input text of each row)")
        if len(frame) == 0:
            raise RequestError("no rows in the request")
        tasks = self._names(frame, "task", self.tasks, self._task_id)
        domains = self._names(frame, "domain", self.domains, self._domain_id)
        prompts = []
        for row, (text, t, d) in enumerate(zip(frame[column], tasks, domains)):
            if not isinstance(text, str) or not text.strip():
                raise RequestError(f"row {row}: {column} must be a non-empty string, got {text!r}"[:200])
            if len(text) > MAX_TEXT_CHARS:
                raise RequestError(f"row {row}: {column} of {len(text)} characters is over the limit of {MAX_TEXT_CHARS}")
            prompts.append(self.encoder.prompt(text, self.tasks[t], self.domains[d]))
        return prompts, torch.tensor(tasks), torch.tensor(domains)


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def is_number(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


# ---------------------------------------------------------------------------------------------------- MLflow
def signature(inputs: list, outputs: list, params: list | None = None, more_inputs: list = ()):
    """The MLflow signature of a text kind: its ``inputs`` columns, the optional ``task`` and ``domain``, its
    ``more_inputs``, ``outputs`` columns and ``params`` (``ColSpec`` / ``ParamSpec`` lists)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, Schema

    names = [ColSpec("string", "task", required=False), ColSpec("string", "domain", required=False)]
    return ModelSignature(inputs=Schema([*inputs, *names, *more_inputs]), outputs=Schema(outputs),
                          params=ParamSchema(params) if params else None)


def input_example(meta: Mapping[str, Any], column: str, **extra: Any) -> pd.DataFrame:
    """One row per task (the first domain), short text in ``column`` and the ``extra`` columns; no ``task`` /
    ``domain`` column where the model was trained without them (its only one is the placeholder)."""
    from moa.pipelines.data.text import DEFAULT

    rows = [{column: "an example input", "task": task, "domain": meta["domains"][0], **extra} for task in meta["tasks"]]
    unused = [c for c in ("task", "domain") if list(meta[f"{c}s"]) == [DEFAULT]]
    return pd.DataFrame(rows).drop(columns=unused)
