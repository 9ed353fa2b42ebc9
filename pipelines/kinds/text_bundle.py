"""The serving flavour of the text model kinds: a classifier (:class:`~moa.pipelines.kinds.classifier.module.MoAClassifier`) or a
causal LM (:class:`~moa.pipelines.kinds.causal_lm.module.MoACausalLM`) as a bundle of plain files, and the services that answer
requests in names.

A text bundle is a folder (no pickle, no absolute path)::

    service.json        kind ("classifier" | "causal-lm"), task / domain / label names, the prompt template and
                        lengths of the training data, the head's shape, the gating metrics, the moa version
    adapter/            the MoA layers (:meth:`moa.MoAModel.save_pretrained`)
    head.safetensors    the classification head (classifiers)
    base/               the base model without adapters (``save_pretrained``), unless referenced by name
    tokenizer/          the tokenizer the data was encoded with
    moa_manifest.json   sha256 of every file, checked at load

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
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from moa.experts.errors import UserError, UserTypeError
import moa
from moa.atomic import atomic_folder, read_json, read_safetensors, readable, verify

from moa.pipelines.bundle import RequestError

SERVICE_FILE, ADAPTER_DIR, BASE_DIR, TOKENIZER_DIR, HEAD_FILE, CONFIG_FILE = (
    "service.json", "adapter", "base", "tokenizer", "head.safetensors", "config.yaml")
CLASSIFIER, CAUSAL_LM = "classifier", "causal-lm"
MAX_TEXT_CHARS = 100_000  # per row, before tokenization (which truncates to the training length)
MAX_NEW_TOKENS = 512


# ---------------------------------------------------------------------------------------------------- writing
def write_text_bundle(directory: str | Path, module, datamodule=None, *, metrics: Mapping[str, float] | None = None,
                      base: str = "include", config_yaml: str | Path | None = None) -> Path:
    """Write the bundle of a trained :class:`MoAClassifier` or :class:`MoACausalLM` (``datamodule``: the
    :class:`~moa.pipelines.data.text.TextData` it was trained on, for the tokenizer, names, template and lengths).

    ``base="include"`` ships the base model's weights; ``"reference"`` records the backbone's name instead
    (``"minilm"``, the installed all-MiniLM-L6-v2, or a relative folder / hub name ``from_pretrained`` finds where
    the bundle is loaded); an absolute path is refused as not portable. The folder is replaced as a whole.
    """
    if base not in ("include", "reference"):
        raise UserError(f"base must be 'include' or 'reference', got {base!r}")
    meta = _describe(module, datamodule)
    if base == "reference":
        meta["base_reference"] = _portable_reference(getattr(module, "backbone", None))
    meta["metrics"] = {str(k): float(v) for k, v in (metrics or {}).items()}
    tokenizer = getattr(datamodule, "tokenizer", None) or getattr(module, "tokenizer", None)
    if tokenizer is None and meta["kind"] == CAUSAL_LM:
        tokenizer = module._tokenizer()
    if tokenizer is None:
        raise UserError("a text bundle needs the tokenizer the model was trained with: pass the data module "
                         "(moa.pipelines.data.text.TextData)")
    head = module.head if meta["kind"] == CLASSIFIER else None
    return write_bundle_files(directory, module.model, tokenizer, meta, head=head, include_base=base == "include",
                              config_yaml=config_yaml)


def write_bundle_files(directory: str | Path, model: moa.MoAModel, tokenizer, meta: Mapping[str, Any], *,
                       head: nn.Module | None = None, include_base: bool = True,
                       config_yaml: str | Path | None = None) -> Path:
    """The files of a text bundle from its parts (``meta``: the ``service.json``; without ``include_base`` it must
    name ``base_reference``). The folder is replaced as a whole (:func:`moa.atomic.atomic_folder`)."""
    if not include_base and not meta.get("base_reference"):
        raise UserError("a bundle without its base needs meta['base_reference'] (how to load the base)")
    target = Path(directory)
    with atomic_folder(target) as tmp:
        # the adapters name their base relative to themselves (moa.load(bundle / "adapter") finds it)
        model.save_pretrained(tmp / ADAPTER_DIR, base_model_name_or_path=meta.get("base_reference") or f"../{BASE_DIR}")
        if include_base:
            model.save_base(tmp / BASE_DIR)
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp / HEAD_FILE))
        (tmp / SERVICE_FILE).write_text(json.dumps(dict(meta), indent=2))
        if config_yaml is not None:
            (tmp / CONFIG_FILE).write_bytes(Path(config_yaml).read_bytes())
    return target


def _describe(module, datamodule) -> dict[str, Any]:
    from moa.pipelines.kinds.causal_lm.module import MoACausalLM
    from moa.pipelines.kinds.classifier.module import MoAClassifier, TaskLabelHead

    template = getattr(datamodule, "prompt_template", "{text}")
    max_length = int(getattr(datamodule, "max_length", 128))
    tasks = list(getattr(datamodule, "task_names", None) or ["default"])
    domains = list(getattr(datamodule, "domain_names", None) or ["default"])
    meta: dict[str, Any] = {"format_version": 1, "moa_version": moa.__version__, "prompt_template": template,
                            "max_length": max_length, "base_class": type(module.model.model).__name__}
    if isinstance(module, MoAClassifier):
        head = module.head
        if isinstance(head, TaskLabelHead):
            names = module.names or {}
            tasks, domains = list(names.get("tasks", tasks)), list(names.get("domains", domains))
            labels = {task: list(map(str, names["labels"][task])) for task in tasks}
            spec = {"type": "task_labels", "label_counts": head.label_counts}
        elif head is not None:
            n = head.classifier.out_features
            labels = {task: [str(i) for i in range(n)] for task in tasks}
            spec = {"type": "shared", "n_classes": n}
        else:
            raise UserError("the classifier has no head yet: fit it (or build it with its data) before bundling")
        spec["pooling"], spec["hidden_size"] = module.pooling, module.hidden_size
        meta.update(kind=CLASSIFIER, tasks=tasks, domains=domains, labels=labels, head=spec)
    elif isinstance(module, MoACausalLM):
        meta.update(kind=CAUSAL_LM, tasks=list(module.task_names or tasks), domains=domains,
                    max_new_tokens=int(module._budget), eos_token_id=module.eos_token_id,
                    pad_token_id=module.pad_token_id)
    else:
        raise UserTypeError(f"no text bundle for {type(module).__name__}: a MoAClassifier or MoACausalLM is needed")
    return meta


def _portable_reference(backbone: Any) -> str:
    if not isinstance(backbone, str) or backbone in ("tiny-bert", "tiny-llama", "tiny-gpt2"):
        raise UserError(f"base='reference' needs a backbone others can load by name; {backbone!r} is built from "
                         "a random config: use base='include'")
    if Path(backbone).expanduser().is_absolute():
        raise UserError(f"base='reference' with the absolute path {backbone!r} is not portable: use "
                         "base='include', or a relative folder or hub name")
    return backbone


# ---------------------------------------------------------------------------------------------------- loading
def _load_base(folder: Path, meta: Mapping[str, Any]) -> nn.Module:
    import transformers

    from moa.pipelines.kinds.classifier.module import minilm_dir

    reference = meta.get("base_reference")
    source = folder / BASE_DIR if reference is None else (minilm_dir() if reference == "minilm" else reference)
    fallback = transformers.AutoModelForCausalLM if meta["kind"] == CAUSAL_LM else transformers.AutoModel
    cls = getattr(transformers, meta.get("base_class") or "", None)
    cls = cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else fallback
    try:
        return cls.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the bundle's base model from {source}: {error}") from error


def load_text_bundle(directory: str | Path) -> tuple[dict[str, Any], moa.MoAModel, Any, nn.Module | None]:
    """``(meta, moa_model, tokenizer, head)`` of a bundle, every file checked against the manifest first."""
    from transformers import AutoTokenizer

    from moa.lightning import ClassificationHead

    from moa.pipelines.kinds.classifier.module import TaskLabelHead

    folder = readable(directory)
    verify(folder)
    meta = read_json(folder / SERVICE_FILE)
    if meta.get("kind") not in (CLASSIFIER, CAUSAL_LM):
        raise UserError(f"{folder / SERVICE_FILE}: not a text bundle (kind {meta.get('kind')!r})")
    model = moa.load(folder / ADAPTER_DIR, _load_base(folder, meta)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    head = None
    if meta["kind"] == CLASSIFIER:
        spec = meta["head"]
        if spec["type"] == "task_labels":
            head = TaskLabelHead(spec["hidden_size"], spec["label_counts"], spec["pooling"])
        else:
            head = ClassificationHead(spec["hidden_size"], spec["n_classes"], spec["pooling"])
        head.load_state_dict(read_safetensors(folder / HEAD_FILE), strict=True)
        head.eval()
    return meta, model, tokenizer, head


# ---------------------------------------------------------------------------------------------------- services
class _TextService:
    """Shared by both kinds: the names -> ids of a row's task and domain, and the prompt template."""

    text_column = "text"
    threadsafe = True  # callers may share the service between threads (see the module's docstring)

    def __init__(self, meta, model, tokenizer, head=None):
        self.meta, self.model, self.tokenizer, self.head = dict(meta), model, tokenizer, head
        self._model_lock = threading.Lock()  # one forward call at a time: the routing context is the model's
        self.tasks, self.domains = list(meta["tasks"]), list(meta["domains"])
        self._task_id = {name: i for i, name in enumerate(self.tasks)}
        self._domain_id = {name: i for i, name in enumerate(self.domains)}
        self.template, self.max_length = meta["prompt_template"], int(meta["max_length"])

    @classmethod
    def from_bundle(cls, directory: str | Path):
        return cls(*load_text_bundle(directory))

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
            if _missing(name) and len(known) == 1:
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
            prompts.append(self.template.format(text=text, task=self.tasks[t], domain=self.domains[d]))
        return prompts, torch.tensor(tasks), torch.tensor(domains)


class ClassifierService(_TextService):
    """Rows ``{text, task, domain}`` -> ``label``, ``probability``, ``labels``, ``probabilities``."""

    KIND, GATE = CLASSIFIER, ("val/accuracy", "max")

    @torch.no_grad()
    def predict_frame(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None, *,
                      check: Callable[[], None] | None = None) -> pd.DataFrame:
        if params:
            raise RequestError(f"unknown params {sorted(params)}; a classifier takes none")
        prompts, task_ids, domain_ids = self._prompts(frame)
        encoded = self.tokenizer(prompts, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        mask = encoded["attention_mask"]
        with self._model_lock:
            outputs = self.model(input_ids=encoded["input_ids"], attention_mask=mask, task_ids=task_ids,
                                 domain_ids=domain_ids)
            if self.meta["head"]["type"] == "task_labels":
                logits = self.head(outputs.last_hidden_state, mask, task_ids)
            else:
                logits = self.head(outputs.last_hidden_state, mask)
        probs = logits.float().softmax(-1)
        rows = []
        for task, p in zip(task_ids.tolist(), probs):
            labels = self.meta["labels"][self.tasks[task]]
            p = p[: len(labels)].tolist()
            best = max(range(len(labels)), key=p.__getitem__)
            rows.append({"label": labels[best], "probability": p[best], "labels": labels, "probabilities": p})
        return pd.DataFrame(rows)


class GenerationService(_TextService):
    """Rows ``{prompt, task, domain, max_new_tokens, temperature, top_p}`` -> ``text``.

    ``temperature`` 0 (the default) decodes greedily; above 0 it samples with that temperature and nucleus
    ``top_p``. Each row may set its own ``max_new_tokens`` / ``temperature`` / ``top_p``; the request's
    ``params`` give defaults for rows without them, and ``seed`` makes sampling reproducible.
    """

    KIND, GATE = CAUSAL_LM, ("val/loss", "min")
    text_column = "prompt"

    def __init__(self, meta, model, tokenizer, head=None):
        super().__init__(meta, model, tokenizer, head)
        self._local = threading.local()  # whether this thread is in this service's generate
        # every forward call of the base model (each decode step) of a generation takes the model's lock; the
        # routing context is the calling thread's own (moa.layer.ContextSlot), set once by MoAModel.generate
        self.model.model.register_forward_pre_hook(self._enter_step)
        self.model.model.register_forward_hook(self._leave_step, always_call=True)

    def _enter_step(self, module, args) -> None:
        if getattr(self._local, "generating", False):
            self._model_lock.acquire()
            self._local.holding = True

    def _leave_step(self, module, args, output) -> None:
        if getattr(self._local, "holding", False):
            self._local.holding = False
            self._model_lock.release()

    def _request(self, params: Mapping[str, Any] | None) -> tuple[dict[str, Any], Any]:
        """The request's params without ``seed``, and the seed, both checked."""
        params = dict(params or {})
        seed = params.pop("seed", None)
        unknown = sorted(set(params) - {"max_new_tokens", "temperature", "top_p"})
        if unknown:
            raise RequestError(f"unknown params {unknown}; this model takes max_new_tokens, temperature, top_p, seed")
        if seed is not None and not (_is_number(seed) and float(seed) == int(seed)):
            raise RequestError(f"seed must be an integer, got {seed!r}")
        return params, seed

    def generated_tokens(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None) -> int:
        """The most new tokens the rows may generate in all: the sum of their ``max_new_tokens`` (checked)."""
        return sum(self._settings(frame, self._request(params)[0])[0])

    def _settings(self, frame: pd.DataFrame, params: Mapping[str, Any]) -> tuple[list[int], Tensor, Tensor]:
        defaults = {"max_new_tokens": self.meta["max_new_tokens"], "temperature": 0.0, "top_p": 1.0, **params}
        columns = {}
        for name in ("max_new_tokens", "temperature", "top_p"):
            given = frame[name] if name in frame.columns else [None] * len(frame)
            columns[name] = [defaults[name] if _missing(v) else v for v in given]
        budgets = []
        for row, (n, t, p) in enumerate(zip(columns["max_new_tokens"], columns["temperature"], columns["top_p"])):
            if not _is_number(n) or float(n) != int(n) or not 1 <= int(n) <= MAX_NEW_TOKENS:
                raise RequestError(f"row {row}: max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {n!r}")
            if not _is_number(t) or not 0 <= float(t) <= 100:
                raise RequestError(f"row {row}: temperature must be a number in [0, 100] (0: greedy), got {t!r}")
            if not _is_number(p) or not 0 < float(p) <= 1:
                raise RequestError(f"row {row}: top_p must be a number in (0, 1], got {p!r}")
            budgets.append(int(n))
        return (budgets, torch.tensor([float(t) for t in columns["temperature"]]),
                torch.tensor([float(p) for p in columns["top_p"]]))

    @torch.no_grad()
    def predict_frame(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None, *,
                      check: Callable[[], None] | None = None) -> pd.DataFrame:
        from transformers import StoppingCriteriaList

        params, seed = self._request(params)
        prompts, task_ids, domain_ids = self._prompts(frame)
        budgets, temperatures, top_ps = self._settings(frame, params)
        ids = [x[-self.max_length:] for x in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        pad = self.meta.get("pad_token_id") or 0
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        options = dict(max_new_tokens=max(budgets), eos_token_id=self.meta.get("eos_token_id"), pad_token_id=pad,
                       do_sample=False, num_beams=1)
        if bool((temperatures > 0).any()):  # per-row temperature and nucleus, drawn with the request's own generator
            generator = torch.Generator()  # (not torch's global one: other requests sample at the same time)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
            options["logits_processor"] = [RowSampling(temperatures, top_ps), _Draw(generator)]
        if check is not None:
            options["stopping_criteria"] = StoppingCriteriaList([_Check(check)])
        self._local.generating = True
        try:  # each decode step takes the model's lock (_enter_step); the routing is this thread's
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, task_ids=task_ids,
                                      domain_ids=domain_ids, **options)
        finally:
            self._local.generating = False
        eos = self.meta.get("eos_token_id")
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        texts = []
        for new, budget in zip(out[:, width:].tolist(), budgets):
            new = new[:budget]
            end = next((j for j, i in enumerate(new) if i in eos), len(new))
            texts.append(self.tokenizer.decode(new[:end], skip_special_tokens=True).strip())
        return pd.DataFrame({"text": texts})


class _Check:
    """A ``generate`` stopping criterion that calls ``check()`` after every decode step (it raises to stop the
    generation) and never stops it itself."""

    def __init__(self, check: Callable[[], None]):
        self.check = check

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        self.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _Draw:
    """A ``generate`` logits processor that samples each row's token from softmax(scores) with ``generator`` (one
    uniform number per row, through the cumulative distribution) and keeps only it, so greedy decoding takes it."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        cdf = scores.double().softmax(-1).cumsum(-1).cpu()
        u = torch.rand(cdf.shape[0], 1, generator=self.generator, dtype=cdf.dtype) * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).to(scores.device)
        return torch.full_like(scores, -math.inf).scatter(-1, drawn, 0.0)


class RowSampling:
    """A ``generate`` logits processor with each row's own temperature and top-p; temperature 0 rows keep only
    their argmax (greedy inside a sampling batch)."""

    NUCLEUS_K = 256

    def __init__(self, temperatures: Tensor, top_ps: Tensor):
        self.temperatures, self.top_ps = temperatures, top_ps

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        repeat = scores.shape[0] // self.temperatures.numel()
        temperature = self.temperatures.to(scores.device).repeat_interleave(repeat)[:, None]
        top_p = self.top_ps.to(scores.device).repeat_interleave(repeat)[:, None]
        greedy = temperature == 0
        scaled = scores / temperature.masked_fill(greedy, 1.0)
        drop = torch.zeros_like(scaled, dtype=torch.bool)
        nucleus = ((top_p < 1) & ~greedy).flatten().nonzero().flatten()
        if len(nucleus):  # only the rows with top_p < 1; sorted, the likeliest NUCLEUS_K first (a full sort of
            probs = scaled[nucleus].softmax(-1)  # the vocabulary only when their mass is under top_p)
            ordered, order = probs.topk(min(self.NUCLEUS_K, probs.shape[-1]), dim=-1)
            if bool((ordered.sum(-1, keepdim=True) < top_p[nucleus]).any()):
                ordered, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the best): drop once the mass before >= top_p
            keep_sorted = ordered.cumsum(-1) - ordered < top_p[nucleus]
            drop[nucleus] = ~torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
        best = torch.zeros_like(drop).scatter_(-1, scaled.argmax(-1, keepdim=True), True)
        drop |= greedy & ~best
        return scaled.masked_fill(drop, -math.inf)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_number(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


# ---------------------------------------------------------------------------------------------------- MLflow
def signature(meta: Mapping[str, Any]):
    """The MLflow signature of a text bundle (``task``, ``domain`` and the generation settings optional; the
    settings are doubles, as MLflow wants for columns that may be missing in some rows)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    names = [ColSpec("string", "task", required=False), ColSpec("string", "domain", required=False)]
    if meta["kind"] == CLASSIFIER:
        return ModelSignature(
            inputs=Schema([ColSpec("string", "text"), *names]),
            outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                            ColSpec(Array("string"), "labels"), ColSpec(Array("double"), "probabilities")]))
    settings = [ColSpec("double", name, required=False) for name in ("max_new_tokens", "temperature", "top_p")]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), *names, *settings]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", int(meta["max_new_tokens"])),
                            ParamSpec("temperature", "double", 0.0), ParamSpec("top_p", "double", 1.0),
                            ParamSpec("seed", "long", None)]))


def input_example(meta: Mapping[str, Any]) -> pd.DataFrame:
    """One row per task (the first domain), short text."""
    column = "text" if meta["kind"] == CLASSIFIER else "prompt"
    rows = [{column: "an example input", "task": task, "domain": meta["domains"][0]} for task in meta["tasks"]]
    if meta["kind"] == CAUSAL_LM:
        for row in rows:
            row["max_new_tokens"] = 4.0
    return pd.DataFrame(rows)
