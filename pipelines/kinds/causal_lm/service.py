"""The causal LM's serving flavour: rows ``{prompt, task, domain, max_new_tokens, temperature, top_p}`` of a text
bundle (:mod:`moa.pipelines.kinds.text_bundle`) -> generated ``text``, every row with its own routing, budget and
sampling settings in one ``generate`` call."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch
from torch import Tensor

from moa.pipelines.bundle import RequestError
from moa.pipelines.kinds import text_bundle
from moa.pipelines.kinds.text_bundle import CAUSAL_LM, TextService, is_number, missing

MAX_NEW_TOKENS = 512


class GenerationService(TextService):
    """Rows ``{prompt, task, domain, max_new_tokens, temperature, top_p}`` -> ``text``.

    ``temperature`` 0 (the default) decodes greedily; above 0 it samples with that temperature and nucleus
    ``top_p``. Each row may set its own ``max_new_tokens`` / ``temperature`` / ``top_p``; the request's
    ``params`` give defaults for rows without them, and ``seed`` makes sampling reproducible.
    """

    KIND, BASE_FALLBACK = CAUSAL_LM, "AutoModelForCausalLM"
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
        if seed is not None and not (is_number(seed) and float(seed) == int(seed)):
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
            columns[name] = [defaults[name] if missing(v) else v for v in given]
        budgets = []
        for row, (n, t, p) in enumerate(zip(columns["max_new_tokens"], columns["temperature"], columns["top_p"])):
            if not is_number(n) or float(n) != int(n) or not 1 <= int(n) <= MAX_NEW_TOKENS:
                raise RequestError(f"row {row}: max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {n!r}")
            if not is_number(t) or not 0 <= float(t) <= 100:
                raise RequestError(f"row {row}: temperature must be a number in [0, 100] (0: greedy), got {t!r}")
            if not is_number(p) or not 0 < float(p) <= 1:
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
        input_ids, mask = self.encoder.prompts(prompts)  # training's prompt tokens, left-padded (TextData)
        width = input_ids.shape[1]
        options = dict(max_new_tokens=max(budgets), eos_token_id=self.encoder.eos_token_id,
                       pad_token_id=self.encoder.pad_token_id, do_sample=False, num_beams=1)
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
        texts = [self.encoder.decode(new[:budget]) for new, budget in zip(out[:, width:].tolist(), budgets)]
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


def signature(meta: Mapping[str, Any]):
    """Inputs ``prompt`` (``task``, ``domain`` and the generation settings optional: doubles, as MLflow wants for
    columns that may be missing in some rows); output ``text``; params the settings and ``seed``."""
    from mlflow.types import ColSpec, ParamSpec

    settings = [ColSpec("double", name, required=False) for name in ("max_new_tokens", "temperature", "top_p")]
    return text_bundle.signature(
        [ColSpec("string", "prompt")], [ColSpec("string", "text")],
        [ParamSpec("max_new_tokens", "long", int(meta["max_new_tokens"])), ParamSpec("temperature", "double", 0.0),
         ParamSpec("top_p", "double", 1.0), ParamSpec("seed", "long", None)], more_inputs=settings)


def input_example(folder: str | Path) -> pd.DataFrame:
    return text_bundle.input_example(text_bundle.read_meta(folder), "prompt", max_new_tokens=4.0)
