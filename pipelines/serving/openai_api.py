"""The OpenAI-compatible API of moa's scoring server, for a served causal LM (a bundle or an expert pool):
``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET /v1/models``, so that the ``openai`` client and
tools written for vLLM, SGLang or LoRAX reach the model unchanged::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:5055/v1", api_key="unused")
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "Hi"}], max_tokens=32)

``model`` names what answers (``GET /v1/models`` lists them): the served model, by the name it has in the
registry (``my-pool`` of ``models:/my-pool@champion``; a folder's name for a path), routed as ``/invocations``
routes a row (the body's ``task`` / ``domain`` choose them where it knows several); one of its tasks (a pool's
experts: that expert); or ``base``, the base model with the adapters off (unless the model has a task of that
name). Chat requests are turned into a prompt by the tokenizer's chat template (``apply_chat_template`` with the
generation prompt). Supported: ``max_tokens`` (``max_completion_tokens``; default: the bundle's
``max_new_tokens``), ``temperature`` (default 1, in [0, 2]; 0 is greedy), ``top_p``, ``seed``, ``stop`` (up to 16
strings), ``stream`` (server-sent events ``data: {...}`` then ``data: [DONE]``; ``stream_options.include_usage``),
``n`` = 1, and the extensions ``top_k`` and ``repetition_penalty``; every choice has its ``finish_reason``
(``stop``: eos or a stop string, ``length``: ``max_tokens``) and the answer its token ``usage`` (completion tokens
count the one that ended the text). Unknown fields are ignored; fields this server cannot honour (``n`` > 1,
``logprobs``, ``echo``, ``best_of`` > 1, presence or frequency penalties, ``suffix``) are refused.

The generation is the service's own (:meth:`moa.pipelines.kinds.causal_lm.service.GenerationService.run`, the
path of ``/invocations``), under the same limits: body size, ``max_rows`` prompts, ``max_generated_tokens``, the
per-request ``timeout`` (503, or an error event once a stream has started; a stream whose client goes away stops
at the next decode step). A prompt never is cut: with its ``max_tokens`` it must fit the model's context, else 400
``context_length_exceeded`` naming the lengths. Errors have OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``: 400 for bad values, 404 ``model_not_found``, 413, 415, 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from starlette.requests import Request

from moa.pipelines.bundle import RequestError
from moa.pipelines.serving.requests import BodyTooLarge, Work, content_type, read_body

log = logging.getLogger("moa.server")
BASE = "base"  # the model name of the base alone (adapters off)
ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED = {  # field -> the values this server honours (anything else is refused, not ignored)
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "suffix": (None, ""),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Stopped(Exception):
    """The generation passed its deadline, or its stream's client went away."""


def served_name(model_uri: str) -> str:
    """The name ``model`` gives the served model: the registered name of ``models:/<name>/...``, else the last part
    of the URI or path."""
    match = re.fullmatch(r"models:/([^/@]+)(?:[/@].*)?", model_uri)
    return match.group(1) if match else (model_uri.rstrip("/").rsplit("/", 1)[-1] or "moa")


class Catalog:
    """The names ``model`` may give and what each runs: the served model (routed), its tasks, ``base``."""

    def __init__(self, service, name: str):
        self.service, self.name, self.tasks = service, name, list(service.tasks)

    def ids(self) -> list[str]:
        return list(dict.fromkeys([self.name, *self.tasks, BASE]))

    def route(self, model: Any, body: dict) -> tuple[str | None, str | None, bool]:
        """``(task, domain, adapters)`` of a request for ``model``."""
        model = self.name if model is None else model
        domain = body.get("domain")
        if domain is not None and not isinstance(domain, str):
            raise APIError(400, f"domain must be a string, got {domain!r}"[:200], "domain")
        if model == self.name:
            task = body.get("task")
            if task is None and len(self.tasks) > 1:
                raise APIError(400, f"model {model!r} routes each request by its task: name one of its tasks as "
                               f"model ({self.tasks}) or send \"task\"", "model")
            return task, domain, True
        if isinstance(model, str) and model in self.tasks:
            return model, domain, True
        if model == BASE:  # adapters off: the routing names do not matter
            return self.tasks[0], domain or self.service.domains[0], False
        raise APIError(404, f"The model `{model}` does not exist: this server serves {self.ids()} "
                       "(GET /v1/models)"[:500], "model", "model_not_found")


@dataclass
class Ask:
    """A checked request: its rows and params for the service, and how to answer."""

    chat: bool
    model: str
    rows: dict[str, list]
    params: dict[str, Any]
    adapters: bool
    stream: bool
    include_usage: bool


def _integer(body: dict, name: str, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise APIError(400, f"{name} must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}"[:200],
                       name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if open_low else low <= value) and value <= high):
        raise APIError(400, f"{name} must be a number in {'(' if open_low else '['}{low:g}, {high:g}], "
                       f"got {value!r}"[:200], name)
    return float(value)


def _prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise APIError(400, "prompts as token ids are not supported: send the text", "prompt")
    raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")


def chat_prompt(tokenizer, messages: Any) -> str:
    """The prompt of a conversation: the tokenizer's chat template with the generation prompt."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    plain = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise APIError(400, f"messages[{i}]: role must be one of {list(ROLES)}, got {role!r}"[:200], "messages")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}]: content must be a string or a list of text parts", "messages")
        plain.append({"role": "system" if role == "developer" else role, "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "the served model's tokenizer has no chat template: send the prompt to /v1/completions",
                       "messages")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        raise APIError(400, f"the model's chat template refuses these messages: {error}"[:500], "messages") from None


def parse(body: Any, catalog: Catalog, chat: bool) -> Ask:
    """The body of ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions`` checked, as service rows."""
    from moa.pipelines.kinds.causal_lm.service import stop_strings

    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"model must be a string, got {model!r}"[:200], "model")
    task, domain, adapters = catalog.route(model, body)
    for name, honoured in UNSUPPORTED.items():
        if body.get(name) not in honoured:
            instead = "; repetition_penalty is the penalty it has" if name.endswith("penalty") else ""
            raise APIError(400, f"{name}={body[name]!r} is not supported by this server (it takes "
                           f"{' or '.join(map(repr, honoured[1:]))}){instead}"[:300], name)
    prompts = [chat_prompt(catalog.service.tokenizer, body.get("messages"))] if chat else _prompts(body)
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, low=1)
    context = catalog.service.context
    if max_tokens is not None and context is not None and max_tokens > context:
        raise APIError(400, f"{name} must be an integer in [1, {context}] (the model's context), got {max_tokens}",
                       name)
    top_k = _integer(body, "top_k", low=-1)
    seed = _integer(body, "seed")
    if seed is not None and not -2**63 <= seed < 2**63:
        raise APIError(400, f"seed must be a 64-bit integer, got {seed}", "seed")
    try:
        stops = stop_strings(body.get("stop"))
    except RequestError as error:
        raise APIError(400, str(error), "stop") from None
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "stream must be true or false and stream_options an object", "stream")
    params = {"temperature": _number(body, "temperature", 1.0, 0, 2),
              "top_p": _number(body, "top_p", 1.0, 0, 1, open_low=True),
              "top_k": max(top_k or 0, 0),
              "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0, 100, open_low=True),
              "stop": stops, "seed": seed, "max_new_tokens": max_tokens}
    rows = {"prompt": prompts, "task": [task] * len(prompts), "domain": [domain] * len(prompts)}
    return Ask(chat, catalog.name if model is None else model, {k: v for k, v in rows.items() if v[0] is not None},
               {k: v for k, v in params.items() if v is not None}, adapters, stream,
               bool(options.get("include_usage")))


# ------------------------------------------------------------------------------------------------ answers
def usage(answers) -> dict[str, int]:
    prompt, completion = sum(a.prompt_tokens for a in answers), sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(chat: bool, index: int, text: str | None, finish_reason: str | None, *, delta: bool) -> dict[str, Any]:
    if not chat:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if delta:
        return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def completion(ask: Ask, ident: str, created: int, answers) -> dict[str, Any]:
    return {"id": ident, "object": "chat.completion" if ask.chat else "text_completion", "created": created,
            "model": ask.model, "system_fingerprint": None,
            "choices": [_choice(ask.chat, i, a.text, a.finish_reason, delta=False) for i, a in enumerate(answers)],
            "usage": usage(answers)}


def chunk(ask: Ask, ident: str, created: int, choices: list[dict], usage_: dict | None = None) -> str:
    """One server-sent event of a stream."""
    body = {"id": ident, "object": "chat.completion.chunk" if ask.chat else "text_completion", "created": created,
            "model": ask.model, "system_fingerprint": None, "choices": choices}
    if ask.include_usage:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


def error_event(error: APIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


# ------------------------------------------------------------------------------------------------ routes
def add_routes(app, service, *, model_name: str, limits, workers, work: Work) -> None:
    """The ``/v1`` routes on ``app`` for ``service`` (a 404 for every ``/v1`` path unless it generates text),
    under the server's ``limits``, on its ``workers`` threads, counted in its ``work``."""
    from starlette.responses import JSONResponse, StreamingResponse

    def refuse(request: Request, error: APIError) -> JSONResponse:
        log.log(logging.ERROR if error.status >= 500 and error.status != 503 else logging.WARNING, "%d %s %s %s: %s",
                error.status, request.method, request.url.path, error.code or error.param or "", error.message[:200])
        return JSONResponse(error.body(), status_code=error.status)

    if not (callable(getattr(service, "prepare", None)) and callable(getattr(service, "run", None))):
        @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
        async def not_a_language_model(request: Request, path: str):
            return refuse(request, APIError(404, "the served model does not generate text (not a causal LM): "
                                            "score it with POST /invocations", None, "model_not_found"))
        return

    catalog = Catalog(service, model_name)
    started = int(time.time())

    def card(ident: str) -> dict[str, Any]:
        return {"id": ident, "object": "model", "created": started, "owned_by": "moa"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(ident) for ident in catalog.ids()]}

    @app.get("/v1/models/{model:path}")
    async def one_model(request: Request, model: str):
        if model not in catalog.ids():
            return refuse(request, APIError(404, f"The model `{model}` does not exist: this server serves "
                                            f"{catalog.ids()}"[:500], "model", "model_not_found"))
        return card(model)

    def prepare(ask: Ask):
        import pandas as pd

        if len(ask.rows["prompt"]) > limits.max_rows:
            raise APIError(413, f"{len(ask.rows['prompt'])} prompts is more than the limit of {limits.max_rows} "
                           "per request; split the request", "prompt")
        frame = pd.DataFrame(ask.rows)
        try:
            tokens = service.generated_tokens(frame, ask.params)
            if tokens > limits.max_generated_tokens:
                raise APIError(413, f"{len(frame)} prompts ask for up to {tokens} new tokens in all, more than the "
                               f"limit of {limits.max_generated_tokens} new tokens per request; send fewer prompts "
                               "or a smaller max_tokens", "max_tokens")
            return service.prepare(frame, ask.params)
        except RequestError as error:
            raise _api_error(error, ask, len(frame)) from None

    def generate(plan, ask: Ask, deadline: float, cancelled: threading.Event,
                 on_text: Callable[[int, str], None] | None):
        def check():  # after every decode step: stop once the deadline passed or the stream's client left
            work.step()
            if cancelled.is_set() or time.monotonic() > deadline:
                raise Stopped()

        with work.scoring(Stopped):
            check()
            return service.run(plan, check=check, on_text=on_text, adapters=ask.adapters)

    timed_out = APIError(503, f"generation took longer than the limit of {limits.timeout:g} s and was stopped; ask "
                         "for fewer max_tokens or prompts, or start the server with a larger --timeout",
                         code="timeout")

    async def answer(request: Request, chat: bool):
        work.stats["requests"] += 1
        loop = asyncio.get_running_loop()
        try:
            ask = parse(await read_json(request, limits.max_body_bytes), catalog, chat)
            plan = await loop.run_in_executor(workers, prepare, ask)
        except APIError as error:
            return refuse(request, error)
        deadline = time.monotonic() + limits.timeout
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        cancelled = threading.Event()
        if ask.stream:
            return StreamingResponse(events(request, ask, plan, ident, created, deadline, cancelled),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        future = loop.run_in_executor(workers, generate, plan, ask, deadline, cancelled, None)
        try:
            answers = await asyncio.wait_for(asyncio.shield(future), limits.timeout + 0.05)
        except (asyncio.TimeoutError, Stopped):
            cancelled.set()
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # its Stopped is expected
            work.stats["timed_out"] += 1
            return refuse(request, timed_out)
        except Exception:  # noqa: BLE001 - the traceback goes to the log, never into the response
            log.exception("500 %s %s", request.method, request.url.path)
            return JSONResponse(APIError(500, "internal error (details in the server's log)").body(), status_code=500)
        return JSONResponse(completion(ask, ident, created, answers))

    async def events(request: Request, ask: Ask, plan, ident: str, created: int, deadline: float,
                     cancelled: threading.Event):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        on_text = lambda row, piece: loop.call_soon_threadsafe(queue.put_nowait, (row, piece))  # noqa: E731
        future = loop.run_in_executor(workers, generate, plan, ask, deadline, cancelled, on_text)
        future.add_done_callback(lambda f: queue.put_nowait(None))  # after every piece (both come through the loop)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        rows = range(len(plan.ids))
        try:
            if ask.chat:
                yield chunk(ask, ident, created, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}])
            while (item := await _next(queue, deadline + 0.05)) is not None:
                yield chunk(ask, ident, created, [_choice(ask.chat, item[0], item[1], None, delta=True)])
            answers = future.result()
        except (asyncio.TimeoutError, Stopped):
            work.stats["timed_out"] += 1
            log.warning("503 %s %s timeout: %s", request.method, request.url.path, timed_out.message[:200])
            yield error_event(timed_out)
            return
        except Exception:  # noqa: BLE001
            log.exception("500 %s %s (streaming)", request.method, request.url.path)
            yield error_event(APIError(500, "internal error (details in the server's log)"))
            return
        finally:
            cancelled.set()  # finished, failed or the client went away: the generation stops at its next step
        yield chunk(ask, ident, created, [_choice(ask.chat, r, None, answers[r].finish_reason, delta=True)
                                          for r in rows])
        if ask.include_usage:
            yield chunk(ask, ident, created, [], usage(answers))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)


async def _next(queue: asyncio.Queue, deadline: float):
    return await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))


def _api_error(error: RequestError, ask: Ask, rows: int) -> APIError:
    """A service's refusal as an API error: the row named only when there are several prompts."""
    from moa.pipelines.kinds.causal_lm.service import ContextTooLong

    message = str(error).removeprefix("row 0: ") if rows == 1 else str(error)
    if isinstance(error, ContextTooLong):
        return APIError(400, message, "messages" if ask.chat else "prompt", "context_length_exceeded")
    param = next((name for name in ("max_new_tokens", "task", "domain", "prompt") if name in message), None)
    return APIError(400, message, {"max_new_tokens": "max_tokens"}.get(param, param))


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, within ``max_bytes`` (413), with a JSON Content-Type (415)."""
    kind = content_type(request)
    if kind != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {kind or 'none'}")
    try:
        body = await read_body(request, max_bytes)
    except BodyTooLarge:
        raise APIError(413, f"the body is over the limit of {max_bytes} bytes") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:
        raise APIError(400, f"the body is not valid JSON ({error})"[:300]) from None
