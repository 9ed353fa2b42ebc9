"""The causal LM's serving flavour: rows ``{prompt, task, domain, max_new_tokens, temperature, top_p, top_k,
repetition_penalty}`` of a text bundle (:mod:`moa.pipelines.kinds.text_bundle`) -> generated ``text``, every row
with its own routing, budget and sampling settings in one ``generate`` call; the request's params give the rows'
defaults, ``stop`` strings and a ``seed``.

:meth:`GenerationService.prepare` checks and tokenizes a request and :meth:`GenerationService.run` generates it:
the one generation path of ``POST /invocations`` (:meth:`~GenerationService.predict_frame`: the texts) and of the
OpenAI-compatible API (:mod:`moa.pipelines.serving.openai_api`: also each row's finish reason and token counts,
and the text while it is generated). A prompt is never cut: one that leaves no room for its ``max_new_tokens`` in
the model's context (``max_position_embeddings``) is refused (:class:`ContextTooLong`), and that context is the
only bound of ``max_new_tokens``.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from moa.pipelines.bundle import RequestError
from moa.pipelines.data.text import pad_prompts
from moa.pipelines.kinds import text_bundle
from moa.pipelines.kinds.text_bundle import CAUSAL_LM, TextService, is_number, missing

SETTINGS = {"max_new_tokens": None, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
"""A row's generation settings and their defaults (``max_new_tokens``: the bundle's)."""
MAX_STOPS = 16


class ContextTooLong(RequestError):
    """A prompt and its ``max_new_tokens`` do not fit in the model's context."""

    def __init__(self, row: int, prompt_tokens: int, max_new_tokens: int, context: int):
        super().__init__(f"row {row}: the prompt is {prompt_tokens} tokens and max_new_tokens {max_new_tokens}: "
                         f"{prompt_tokens + max_new_tokens} tokens, more than the model's context of {context}; "
                         "shorten the prompt or ask for fewer new tokens")
        self.row, self.prompt_tokens, self.max_new_tokens, self.context = row, prompt_tokens, max_new_tokens, context


@dataclass
class Settings:
    """Each row's checked settings."""

    budgets: list[int]
    temperatures: Tensor
    top_ps: Tensor
    top_ks: Tensor
    penalties: Tensor

    def rows(self, rows: Sequence[int]) -> "Settings":
        index = torch.tensor(list(rows))
        return Settings([self.budgets[r] for r in rows], self.temperatures[index], self.top_ps[index],
                        self.top_ks[index], self.penalties[index])


@dataclass
class Plan:
    """A checked request (:meth:`GenerationService.prepare`): every prompt's tokens, routing and settings."""

    ids: list[list[int]]
    task_ids: Tensor
    domain_ids: Tensor
    settings: Settings
    stops: list[str]
    seed: int | None


@dataclass
class Generated:
    """A row's answer: its text, why it ended (``"stop"``: eos or a stop string, ``"length"``: its
    ``max_new_tokens``), its prompt's tokens and the tokens generated (the one that ended it included)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class GenerationService(TextService):
    """Rows ``{prompt, task, domain, max_new_tokens, temperature, top_p, top_k, repetition_penalty}`` -> ``text``.

    ``temperature`` 0 (the default) decodes greedily; above 0 it samples with that temperature, ``top_k`` (0: all
    tokens) and nucleus ``top_p``; ``repetition_penalty`` (1: off) divides the positive (multiplies the negative)
    logits of tokens already in the prompt or the text, greedy or not. Each row may set its own settings; the
    request's ``params`` give defaults for rows without them, ``stop`` (strings: a row's text ends before the first
    of them) and ``seed`` (reproducible sampling).
    """

    KIND, BASE_FALLBACK = CAUSAL_LM, "AutoModelForCausalLM"
    text_column = "prompt"

    def __init__(self, meta, model, tokenizer, head=None):
        super().__init__(meta, model, tokenizer, head)
        self._local = threading.local()  # whether this thread is in this service's generate, adapters on or off
        self._layers = list(self.model.moa_layers().values())
        eos = self.encoder.eos_token_id
        self._eos = torch.tensor(sorted({eos} if isinstance(eos, int) else set(eos)))
        # every forward call of the base model (each decode step) of a generation takes the model's lock; the
        # routing context is the calling thread's own (moa.layer.ContextSlot), set once by MoAModel.generate
        self.model.model.register_forward_pre_hook(self._enter_step)
        self.model.model.register_forward_hook(self._leave_step, always_call=True)

    def _enter_step(self, module, args) -> None:
        if getattr(self._local, "generating", False):
            self._model_lock.acquire()
            self._local.holding = True
            if getattr(self._local, "base_only", False):  # the base alone for this step (no other step runs now)
                for layer in self._layers:
                    layer.disabled = True

    def _leave_step(self, module, args, output) -> None:
        if getattr(self._local, "holding", False):
            self._local.holding = False
            if self._local.base_only:
                for layer in self._layers:
                    layer.disabled = False
            self._model_lock.release()

    @property
    def context(self) -> int | None:
        """The most tokens (prompt and new ones) the model takes: its config's ``max_position_embeddings``."""
        config = getattr(self.model.model, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _request(self, params: Mapping[str, Any] | None) -> tuple[dict[str, Any], Any, list[str]]:
        """The request's settings params, its seed and stop strings, checked."""
        params = dict(params or {})
        seed, stop = params.pop("seed", None), params.pop("stop", None)
        unknown = sorted(set(params) - set(SETTINGS))
        if unknown:
            raise RequestError(f"unknown params {unknown}; this model takes {', '.join(SETTINGS)}, stop, seed")
        if seed is not None and not (is_number(seed) and float(seed) == int(seed)):
            raise RequestError(f"seed must be an integer, got {seed!r}")
        return params, seed, stop_strings(stop)

    def generated_tokens(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None) -> int:
        """The most new tokens the rows may generate in all: the sum of their ``max_new_tokens`` (checked)."""
        return sum(self._settings(frame, self._request(params)[0]).budgets)

    def _settings(self, frame: pd.DataFrame, params: Mapping[str, Any]) -> Settings:
        defaults = {**SETTINGS, "max_new_tokens": self.meta["max_new_tokens"], **params}
        columns = {}
        for name in SETTINGS:
            given = frame[name] if name in frame.columns else [None] * len(frame)
            columns[name] = [defaults[name] if missing(v) else v for v in given]
        context = self.context
        most = context or math.inf
        for row, (n, t, p, k, penalty) in enumerate(zip(*columns.values())):
            if not is_number(n) or float(n) != int(n) or not 1 <= int(n) <= most:
                bound = f"in [1, {context}] (the model's context)" if context else ">= 1"
                raise RequestError(f"row {row}: max_new_tokens must be an integer {bound}, got {n!r}")
            if not is_number(t) or not 0 <= float(t) <= 100:
                raise RequestError(f"row {row}: temperature must be a number in [0, 100] (0: greedy), got {t!r}")
            if not is_number(p) or not 0 < float(p) <= 1:
                raise RequestError(f"row {row}: top_p must be a number in (0, 1], got {p!r}")
            if not is_number(k) or float(k) != int(k) or int(k) < 0:
                raise RequestError(f"row {row}: top_k must be an integer >= 0 (0: every token), got {k!r}")
            if not is_number(penalty) or not 0 < float(penalty) <= 100:
                raise RequestError(f"row {row}: repetition_penalty must be a number in (0, 100] (1: none), "
                                   f"got {penalty!r}")
        return Settings([int(n) for n in columns["max_new_tokens"]],
                        torch.tensor([float(t) for t in columns["temperature"]]),
                        torch.tensor([float(p) for p in columns["top_p"]]),
                        torch.tensor([int(k) for k in columns["top_k"]]),
                        torch.tensor([float(x) for x in columns["repetition_penalty"]]))

    def prepare(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None) -> Plan:
        """The request checked and tokenized (a :class:`RequestError` names the row and the problem)."""
        params, seed, stops = self._request(params)
        prompts, task_ids, domain_ids = self._prompts(frame)
        settings = self._settings(frame, params)
        ids = self.encoder.prompt_tokens(prompts)  # training's tokens, never cut: refused past the context
        context = self.context
        for row, (prompt, budget) in enumerate(zip(ids, settings.budgets)):
            if context is not None and len(prompt) + budget > context:
                raise ContextTooLong(row, len(prompt), budget, context)
        return Plan(ids, task_ids, domain_ids, settings, stops, None if seed is None else int(seed))

    @torch.no_grad()
    def predict_frame(self, frame: pd.DataFrame, params: Mapping[str, Any] | None = None, *,
                      check: Callable[[], None] | None = None) -> pd.DataFrame:
        return pd.DataFrame({"text": [answer.text for answer in self.run(self.prepare(frame, params), check=check)]})

    @torch.no_grad()
    def run(self, plan: Plan, *, check: Callable[[], None] | None = None,
            on_text: Callable[[int, str], None] | None = None, adapters: bool = True) -> list[Generated]:
        """Generate the rows of ``plan``: one ``generate`` call (one per row when together they would run past the
        context: a finished row's positions go on with the batch). ``check()`` runs after every decode step and may
        raise to stop; ``on_text(row, piece)`` gets each row's text in pieces as it grows (their concatenation is
        the row's final text); ``adapters=False`` runs the base model alone."""
        rows = range(len(plan.ids))
        longest, budget = max(map(len, plan.ids)), max(plan.settings.budgets)
        together = self.context is None or longest + budget <= self.context
        groups = [list(rows)] if together else [[r] for r in rows]
        answers: list[Generated | None] = [None] * len(plan.ids)
        for group in groups:
            stream = None if on_text is None else (lambda i, piece, group=group: on_text(group[i], piece))
            done = self._generate([plan.ids[r] for r in group], plan.task_ids[group], plan.domain_ids[group],
                                  plan.settings.rows(group), plan, check, stream, adapters)
            for r, answer in zip(group, done):
                answers[r] = answer
        return answers

    def _generate(self, ids, task_ids, domain_ids, settings: Settings, plan: Plan, check, on_text,
                  adapters: bool) -> list[Generated]:
        from transformers import StoppingCriteriaList

        input_ids, mask = pad_prompts(ids, self.encoder.pad_token_id)  # left-padded, as in training (TextData)
        width, budgets = input_ids.shape[1], settings.budgets
        progress = _Progress(self, width, budgets, plan.stops, check, on_text)
        options = dict(max_new_tokens=max(budgets), eos_token_id=self.encoder.eos_token_id,
                       pad_token_id=self.encoder.pad_token_id, do_sample=False, num_beams=1,
                       stopping_criteria=StoppingCriteriaList([progress]))
        sampling = bool((settings.temperatures > 0).any())
        if sampling or bool((settings.penalties != 1).any()):
            starts = torch.tensor([width - len(x) for x in ids])
            options["logits_processor"] = [RowSampling(settings.temperatures, settings.top_ps, settings.top_ks,
                                                       settings.penalties, starts)]
            if sampling:  # drawn with the request's own generator (not torch's global one: other requests sample
                generator = torch.Generator()  # at the same time)
                if plan.seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(plan.seed)
                options["logits_processor"].append(_Draw(generator))
        self._local.generating, self._local.base_only = True, not adapters
        try:  # each decode step takes the model's lock (_enter_step); the routing is this thread's
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, task_ids=task_ids,
                                      domain_ids=domain_ids, **options)
        finally:
            self._local.generating = self._local.base_only = False
        answers = []
        for row, new in enumerate(out[:, width:].tolist()):
            ended = int(progress.lengths[row])
            new = new[:min(ended if ended > 0 else budgets[row], budgets[row])]
            end = next((j for j, token in enumerate(new) if token in progress.eos), None)
            new = new if end is None else new[:end]
            text, stopped = self._text(new, plan.stops)
            answers.append(Generated(text, "stop" if end is not None or stopped else "length", len(ids[row]),
                                     len(new) + (end is not None)))
            progress.finish(row, text)
        return answers

    def _raw_text(self, new_ids: Sequence[int]) -> str:
        """Generated tokens (before any eos) as text, leading whitespace dropped."""
        return self.tokenizer.decode(list(new_ids), skip_special_tokens=True).lstrip()

    def _text(self, new_ids: Sequence[int], stops: Sequence[str]) -> tuple[str, bool]:
        """A row's final text (cut before the first stop string, stripped) and whether a stop string cut it."""
        raw = self._raw_text(new_ids)
        cut = first_stop(raw, stops)
        return (raw if cut is None else raw[:cut]).rstrip(), cut is not None


def stop_strings(stop: Any) -> list[str]:
    """The ``stop`` param as a list: none, one string or a list of (at most :data:`MAX_STOPS`) non-empty ones."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) or hasattr(
        stop, "tolist") else None
    if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, "
                           f"got {stop!r}"[:300])
    return stops


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string in ``text`` starts (None: none is there)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class TextStream:
    """A row's text handed out as it grows, in pieces that never need taking back: what this step's and the
    previous step's decodings agree on (a token may change how the one before it decodes), without trailing
    whitespace (the final text is stripped), an unfinished character or the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.sent, self.previous = list(stops), "", ""

    def step(self, raw: str) -> str:
        stable, self.previous = os.path.commonprefix([self.previous, raw]), raw
        stable = stable.rstrip().rstrip("\ufffd").rstrip()
        held = max((k for s in self.stops for k in range(1, len(s)) if stable.endswith(s[:k])), default=0)
        return self._advance(stable[:len(stable) - held].rstrip())

    def finish(self, text: str) -> str:
        """The rest of the final ``text``."""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


class _Progress:
    """The ``generate`` stopping criterion of a request, called after every decode step: ``check()`` first (it
    raises to stop the generation: the server's deadline), then each row's end (its eos, its ``max_new_tokens``, a
    stop string in its text) and, with ``on_text``, each running row's text so far."""

    def __init__(self, service: GenerationService, width: int, budgets: Sequence[int], stops: Sequence[str],
                 check: Callable[[], None] | None, on_text: Callable[[int, str], None] | None):
        self.service, self.width, self.budgets, self.stops = service, width, torch.tensor(list(budgets)), list(stops)
        self.eos = set(service._eos.tolist())
        self.check, self.on_text = check, on_text
        self.lengths = torch.full((len(budgets),), -1)  # the new tokens when each row ended (-1: running)
        self.streams = [TextStream(stops) for _ in budgets] if on_text is not None else None

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        if self.check is not None:
            self.check()
        n = input_ids.shape[1] - self.width
        running = self.lengths < 0
        ended = running & (torch.isin(input_ids[:, -1].cpu(), self.service._eos) | (self.budgets <= n))
        if self.stops or self.on_text is not None:
            for row in (running & ~ended).nonzero().flatten().tolist():
                raw = self.service._raw_text(input_ids[row, self.width:].tolist())
                if first_stop(raw, self.stops) is not None:
                    ended[row] = True
                elif self.on_text is not None:
                    self._send(row, self.streams[row].step(raw))
        self.lengths[ended] = n
        return (self.lengths >= 0).to(input_ids.device)

    def finish(self, row: int, text: str) -> None:
        if self.streams is not None:
            self._send(row, self.streams[row].finish(text))

    def _send(self, row: int, piece: str) -> None:
        if piece:
            self.on_text(row, piece)


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
    """A ``generate`` logits processor with each row's own repetition penalty, temperature, top-k and top-p, in
    transformers' order (penalty, temperature, top-k, top-p); temperature 0 rows keep only their argmax (greedy
    inside a sampling batch). ``starts``: where each row's prompt starts (after its left padding, which the
    penalty skips)."""

    NUCLEUS_K = 256

    def __init__(self, temperatures: Tensor, top_ps: Tensor, top_ks: Tensor | None = None,
                 penalties: Tensor | None = None, starts: Tensor | None = None):
        self.temperatures, self.top_ps = temperatures, top_ps
        self.top_ks = torch.zeros(len(temperatures), dtype=torch.long) if top_ks is None else top_ks
        self.penalties = torch.ones(len(temperatures)) if penalties is None else penalties
        self.starts = torch.zeros(len(temperatures), dtype=torch.long) if starts is None else starts

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        repeat = scores.shape[0] // self.temperatures.numel()
        per_row = lambda values: values.to(scores.device).repeat_interleave(repeat)[:, None]  # noqa: E731
        temperature, top_p, top_k, penalty = map(per_row, (self.temperatures, self.top_ps, self.top_ks,
                                                           self.penalties))
        if bool((penalty != 1).any()):
            scores = self._penalise(input_ids, scores, penalty, per_row(self.starts))
        greedy = temperature == 0
        scaled = scores / temperature.masked_fill(greedy, 1.0)
        drop = torch.zeros_like(scaled, dtype=torch.bool)
        cut = ((top_k > 0) & (top_k < scaled.shape[-1]) & ~greedy).flatten().nonzero().flatten()
        if len(cut):  # below each row's k-th largest score (ties with it kept, as TopKLogitsWarper)
            k = top_k[cut]
            kth = scaled[cut].topk(int(k.max()), dim=-1).values.gather(-1, k - 1)
            drop[cut] = scaled[cut] < kth
        nucleus = ((top_p < 1) & ~greedy).flatten().nonzero().flatten()
        if len(nucleus):  # only the rows with top_p < 1; sorted, the likeliest NUCLEUS_K first (a full sort of
            probs = scaled[nucleus].masked_fill(drop[nucleus], -math.inf).softmax(-1)  # the vocabulary only
            ordered, order = probs.topk(min(self.NUCLEUS_K, probs.shape[-1]), dim=-1)  # when their mass is under
            if bool((ordered.sum(-1, keepdim=True) < top_p[nucleus]).any()):  # top_p)
                ordered, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the best): drop once the mass before >= top_p
            keep_sorted = ordered.cumsum(-1) - ordered < top_p[nucleus]
            drop[nucleus] |= ~torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
        best = torch.zeros_like(drop).scatter_(-1, scaled.argmax(-1, keepdim=True), True)
        drop |= greedy & ~best
        return scaled.masked_fill(drop, -math.inf)

    @staticmethod
    def _penalise(input_ids: Tensor, scores: Tensor, penalty: Tensor, starts: Tensor) -> Tensor:
        """RepetitionPenaltyLogitsProcessor per row: the scores of the tokens in the row (its padding left out)
        divided by its penalty where positive, multiplied where negative."""
        real = torch.arange(input_ids.shape[1], device=input_ids.device)[None] >= starts
        seen = torch.zeros_like(scores, dtype=torch.long).scatter_add_(-1, input_ids, real.long()) > 0
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(seen, penalised, scores)


def signature(meta: Mapping[str, Any]):
    """Inputs ``prompt`` (``task``, ``domain`` and the generation settings optional: doubles, as MLflow wants for
    columns that may be missing in some rows); output ``text``; params the settings, ``stop`` and ``seed``."""
    from mlflow.types import ColSpec, ParamSpec

    settings = [ColSpec("double", name, required=False) for name in SETTINGS]
    return text_bundle.signature(
        [ColSpec("string", "prompt")], [ColSpec("string", "text")],
        [ParamSpec("max_new_tokens", "long", int(meta["max_new_tokens"])), ParamSpec("temperature", "double", 0.0),
         ParamSpec("top_p", "double", 1.0), ParamSpec("top_k", "long", 0),
         ParamSpec("repetition_penalty", "double", 1.0), ParamSpec("stop", "string", [], shape=(-1,)),
         ParamSpec("seed", "long", None)], more_inputs=settings)


def input_example(folder: str | Path) -> pd.DataFrame:
    return text_bundle.input_example(text_bundle.read_meta(folder), "prompt", max_new_tokens=4.0)
