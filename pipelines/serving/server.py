"""moa's REST scoring server: a registered pyfunc model behind a small, defensive ASGI app (FastAPI + uvicorn).

    moa serve --model-uri models:/moa-recommender@champion [--port 5055] [--timeout 30] [--engine ray]

(the command and the server process are :mod:`moa.pipelines.serving.serve_command`, which runs this app with
uvicorn or on Ray Serve; :class:`moa.pipelines.serving.process.ModelServer` starts it as a process of its own).

A causal LM also answers OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``
(:mod:`moa.pipelines.serving.openai_api`: under the same limits, errors in OpenAI's shape).

``POST /invocations`` takes MLflow's ``dataframe_records`` / ``dataframe_split`` JSON with optional ``params`` and
answers ``{"predictions": [...]}`` like ``mlflow models serve``, with ``"ignored_columns"`` naming the request's
columns the model does not read, if any (:mod:`moa.pipelines.serving.scoring`); ``GET /ping`` and ``GET /health``
answer 200 once the model is loaded. Every error is ``{"error_code", "message"}`` with no traceback (those go to
the server's log): 415 without ``Content-Type: application/json``; 413 for a body over ``max_body_bytes`` (read in
chunks, refused before it is all read or parsed), more than ``max_rows`` rows, or (generation) more than
``max_generated_tokens`` new tokens in all (rows x each row's ``max_new_tokens``); 400 for JSON that is invalid,
nested deeper than ``max_depth`` (checked before parsing) or not the expected shape, and for requests the model
refuses; 503 when scoring takes longer than ``timeout`` seconds (the message names the ``--timeout`` that lets such
a request finish and the ``--max-rows`` that refuses it up front, at the pace of its finished chunks). ``max_rows``
follows ``timeout`` unless given (:class:`Limits`).

Every refused or failed request (4xx, 5xx, 503) is one WARNING line (ERROR for 500, with the traceback) of the
``moa.server`` logger: status, method, path, error code and the message, cut to 200 characters; with
``access_log=True`` (``--access-log``) each answered ``/invocations`` is also an INFO line. The server process
(``moa serve``, ``python -m moa.pipelines.serving.serve_command``, each uvicorn worker) sends it to stderr.

Timeouts really stop the work: scoring runs ``chunk_rows`` rows at a time and checks the request's deadline
between chunks and, for generation, between decode steps; a timed-out request stops at its next check (a request
still queued when its deadline passes never starts). ``scoring_threads`` threads score at once, so a short
request is not queued behind a long one: moa's text services take turns on the model one forward call (decode
step) at a time, other models one chunk at a time. ``/health`` counts the requests stopped that way (``stopped``)
and the checks passed (``steps``: chunks and decode steps). Interactive API docs (``/docs``, ``/openapi.json``)
exist only with ``docs=True`` (``--docs``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator

import numpy as np
from starlette.requests import Request

from moa.experts.errors import UserError, UserTypeError
from moa.pipelines.serving.requests import BodyTooLarge, Work, content_type, read_body
from moa.pipelines.serving.scoring import shift_rows, unread_by

log = logging.getLogger("moa.server")
JSON_TYPES = ("application/json",)
ENV = "MOA_SERVE_CONFIG"  # the server settings of the uvicorn workers (JSON)
ROWS_PER_SECOND = 100  # the pace the default max_rows allows for: a MiniLM classifier, ~64-token rows, 2 cores


@dataclass
class Limits:
    """A server's limits; ``max_rows`` follows ``timeout`` unless given: ``timeout`` x :data:`ROWS_PER_SECOND` rows
    (3000 for the default 30 s), so a request the server accepts has the time to finish."""

    max_body_bytes: int = 16 * 2**20
    max_rows: int | None = None
    max_depth: int = 32
    timeout: float = 30.0
    chunk_rows: int = 256
    max_generated_tokens: int = 16_384  # generation: rows x max_new_tokens per request
    scoring_threads: int = 4

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None and field.name == "max_rows":
                continue  # follows the timeout, below
            kind = (int, float) if field.name == "timeout" else int
            if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
                raise UserError(f"the server limit {field.name} must be a positive "
                                f"{'number' if kind is not int else 'integer'}, got {value!r}")
        if self.max_rows is None:
            self.max_rows = max(1, int(self.timeout * ROWS_PER_SECOND))


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class TimedOut(Exception):
    pass


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[`` / ``{`` in a JSON text, strings skipped (vectorised, no parsing)."""
    text = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", body)
    chars = np.frombuffer(text, dtype=np.uint8)
    opens = (chars == ord("[")) | (chars == ord("{"))
    closes = (chars == ord("]")) | (chars == ord("}"))
    depth = np.cumsum(opens.astype(np.int64) - closes.astype(np.int64))
    return int(depth.max()) if depth.size else 0


def parse_request(body: bytes, limits: Limits):
    """The request body -> (DataFrame, params), or an :class:`HTTPError`."""
    import pandas as pd

    if json_depth(body) > limits.max_depth:
        raise HTTPError(400, "BAD_REQUEST", f"Invalid input: JSON nested deeper than {limits.max_depth} levels")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise HTTPError(400, "BAD_REQUEST", f"Invalid input: the body is not valid JSON ({error})") from None
    if not isinstance(payload, dict) or not ({"dataframe_records", "dataframe_split"} & set(payload)):
        raise HTTPError(400, "BAD_REQUEST", "Invalid input: send a JSON object with 'dataframe_records' (a list of "
                        "rows) or 'dataframe_split' ({'columns': [...], 'data': [...]}), and optionally 'params'")
    params = payload.get("params") or {}
    if not isinstance(params, dict):
        raise HTTPError(400, "BAD_REQUEST", "Invalid input: 'params' must be an object")
    if "dataframe_records" in payload:
        rows = payload["dataframe_records"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise HTTPError(400, "BAD_REQUEST", "Invalid input: 'dataframe_records' must be a list of objects")
        make = lambda: pd.DataFrame.from_records(rows)  # noqa: E731
    else:
        split = payload["dataframe_split"]
        if not isinstance(split, dict) or not isinstance(split.get("data"), list):
            raise HTTPError(400, "BAD_REQUEST", "Invalid input: 'dataframe_split' needs 'columns' and 'data' lists")
        rows = split["data"]
        make = lambda: pd.DataFrame(rows, columns=split.get("columns"))  # noqa: E731
    if len(rows) > limits.max_rows:
        raise HTTPError(413, "REQUEST_TOO_LARGE", f"{len(rows)} rows is more than the limit of {limits.max_rows} "
                        "rows per request; split the request")
    if not rows:
        raise HTTPError(400, "BAD_REQUEST", "Invalid input: no rows in the request")
    try:
        return make(), params
    except (ValueError, TypeError) as error:
        raise HTTPError(400, "BAD_REQUEST", f"Invalid input: {error}") from None


class Scorer:
    """How the server calls a loaded model: ``predict(frame, params, check)``, ``generated_tokens(frame, params)``.

    For a moa pyfunc it is the service's own ``predict``: the services check every row and param themselves, so
    MLflow's schema enforcement and its frame copies (about 1.5 ms of a one-row request) are skipped, and a refused
    request is the same 400. A service with ``threadsafe = True`` (moa's text services: they take turns on the
    model per forward call) is called from several threads at once, and one whose ``predict`` takes ``check``
    calls it between decode steps; any other model is called one chunk at a time (``model.predict``)."""

    def __init__(self, model):
        try:
            service = getattr(model.unwrap_python_model(), "service", None)
        except Exception:  # noqa: BLE001 - not a python_model pyfunc
            service = None
        self.model = model
        self.service = service if callable(getattr(service, "predict", None)) else None
        self.generates = callable(getattr(self.service, "generated_tokens", None))
        self._takes_check = self.service is not None and "check" in inspect.signature(self.service.predict).parameters
        threadsafe = bool(getattr(self.service, "threadsafe", False))
        self._turn = contextlib.nullcontext() if threadsafe else threading.Lock()

    def predict(self, frame, params: dict, check: Callable[[], None]):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        with self._turn:
            if self.service is None:
                return self.model.predict(frame, params=params or None)
            from moa.pipelines.bundle import RequestError

            params = {k: v for k, v in (params or {}).items() if v is not None}
            try:
                if self._takes_check:
                    return self.service.predict(frame, params, check=check)
                return self.service.predict(frame, params)
            except RequestError as error:
                raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None

    def generated_tokens(self, frame, params: dict) -> int | None:
        """The new tokens a generation request asks for in all (None: not a generation model)."""
        if not self.generates:
            return None
        from moa.pipelines.bundle import RequestError

        try:
            return int(self.service.generated_tokens(frame, {k: v for k, v in (params or {}).items() if v is not None}))
        except RequestError as error:
            raise HTTPError(400, "INVALID_PARAMETER_VALUE", str(error)) from None


def score(scorer: Scorer, frame, params: dict, check: Callable[[], None], limits: Limits,
          progress: dict | None = None) -> list:
    """``scorer.predict`` over ``chunk_rows`` rows at a time, ``check()`` (which raises :class:`TimedOut` past the
    deadline) before each chunk and, for generation, between decode steps; ``progress["rows"]``: the rows done."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    outputs = []
    for lo in range(0, len(frame), limits.chunk_rows):
        check()
        part = frame.iloc[lo:lo + limits.chunk_rows].reset_index(drop=True)
        try:
            outputs.append(scorer.predict(part, params, check))
            if progress is not None:
                progress["rows"] = lo + len(part)
        except MlflowException as error:
            status = error.get_http_status_code()
            if status >= 500:
                raise
            raise HTTPError(status, error.error_code, shift_rows(error.message, lo)) from None
    result = pd.concat(outputs, ignore_index=True) if isinstance(outputs[0], pd.DataFrame) else sum(map(list, outputs), [])
    return result.to_dict(orient="records") if isinstance(result, pd.DataFrame) else list(result)


def timeout_message(limits: Limits, cost: str, rows: int, of: int) -> str:
    """The 503's message: which limit to change, and to what at the pace of the stopped request (``rows`` of its
    ``of`` rows done in ``limits.timeout`` seconds) when it finished a chunk."""
    stopped = f"scoring took longer than the limit of {limits.timeout:g} s and was stopped"
    if not rows:
        return (f"{stopped}; send fewer {cost} per request, or start the server with a larger --timeout (seconds; now "
                f"{limits.timeout:g}) or a smaller --max-rows (now {limits.max_rows}) to refuse such requests up "
                "front with 413")
    needed = math.ceil(limits.timeout * of / rows)
    return (f"{stopped} after {rows} of {of} rows; send at most {rows} {cost} per request, or restart the server "
            f"with --timeout {needed} (now {limits.timeout:g}) to let such requests finish, or with --max-rows {rows} "
            f"(now {limits.max_rows}) to refuse them up front with 413")


def _plain(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise UserTypeError(f"{type(value).__name__} is not JSON serializable")


def log_to_stderr() -> None:
    """The server process's logging: INFO lines to stderr (nothing changes where logging is set up already)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def create_app(model, limits: Limits | None = None, *, docs: bool = False, access_log: bool = False,
               model_name: str = "moa"):
    """The ASGI app serving ``model`` (a loaded ``mlflow.pyfunc`` model, or anything with ``predict(frame,
    params=)``) under ``limits``; refused and failed requests are logged (``moa.server``), answered ones too
    with ``access_log``. A causal LM also answers the OpenAI-compatible ``/v1`` API
    (:mod:`moa.pipelines.serving.openai_api`), where ``model_name`` names it."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, Response

    limits = limits or Limits()
    scorer = Scorer(model)
    app = FastAPI(title="moa scoring server", docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    workers = ThreadPoolExecutor(max_workers=limits.scoring_threads, thread_name_prefix="moa-score")
    work = Work()
    cost = "rows or a smaller max_new_tokens" if scorer.generates else "rows"

    def error(request: Request, status: int, code: str, message: str, *, trace: bool = False) -> JSONResponse:
        """The JSON error answer, and its line in the log (WARNING; a failure of the server, 5xx but not the 503 of
        a timeout, as ERROR, with the traceback if ``trace``)."""
        short = message if len(message) <= 200 else message[:197] + "..."
        log.log(logging.ERROR if status >= 500 and status != 503 else logging.WARNING, "%d %s %s %s: %s", status, request.method,
                request.url.path, code, short, exc_info=trace)
        return JSONResponse({"error_code": code, "message": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404, 405, ... as JSON without details of the app
        return error(request, exc.status_code, "NOT_FOUND" if exc.status_code == 404 else "BAD_REQUEST",
                     str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return error(request, 500, "INTERNAL_ERROR", "internal error (details in the server's log)", trace=True)

    @app.get("/ping")
    async def ping():
        return Response("\n", media_type="text/plain")

    @app.get("/health")
    async def health():
        return {"status": "ok", **work.stats}

    def job(body: bytes, deadline: float, progress: dict):
        def check():  # between chunks and decode steps: stop the work once the deadline passed
            work.step()
            if time.monotonic() > deadline:
                raise TimedOut()

        with work.scoring(TimedOut):
            if time.monotonic() > deadline:
                raise TimedOut()
            frame, params = parse_request(body, limits)
            ignored = unread_by(scorer.model, frame.columns)  # named in the answer, never passed to the model
            frame, progress["of"] = frame.drop(columns=ignored), len(frame)
            tokens = scorer.generated_tokens(frame, params)
            if tokens is not None and tokens > limits.max_generated_tokens:
                raise HTTPError(413, "REQUEST_TOO_LARGE", f"{len(frame)} rows ask for up to {tokens} new tokens in "
                                f"all (rows x max_new_tokens), more than the limit of {limits.max_generated_tokens} "
                                "new tokens per request; send fewer rows or a smaller max_new_tokens")
            return score(scorer, frame, params, check, limits, progress), ignored

    @app.post("/invocations")
    async def invocations(request: Request):
        work.stats["requests"] += 1
        kind = content_type(request)
        if kind not in JSON_TYPES:
            return error(request, 415, "UNSUPPORTED_MEDIA_TYPE", f"Content-Type must be application/json, got "
                         f"{kind or 'none'}; send dataframe_records or dataframe_split JSON")
        try:
            body = await read_body(request, limits.max_body_bytes)
        except BodyTooLarge:
            return error(request, 413, "REQUEST_TOO_LARGE", f"the body is over the limit of {limits.max_body_bytes} "
                         "bytes; send fewer rows per request")
        started = time.monotonic()
        deadline = time.monotonic() + limits.timeout
        progress = {"rows": 0, "of": 0}
        future = asyncio.get_running_loop().run_in_executor(workers, job, body, deadline, progress)
        try:
            predictions, ignored = await asyncio.wait_for(asyncio.shield(future), limits.timeout + 0.05)
        except (asyncio.TimeoutError, TimedOut):
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # its TimedOut is expected
            work.stats["timed_out"] += 1
            return error(request, 503, "TIMEOUT", timeout_message(limits, cost, **progress))
        except HTTPError as failure:
            return error(request, failure.status, failure.code, failure.message)
        except Exception:  # noqa: BLE001 - the traceback goes to the log, never into the response
            return error(request, 500, "INTERNAL_ERROR", "internal error (details in the server's log)", trace=True)
        answer = {"predictions": predictions, **({"ignored_columns": ignored} if ignored else {})}
        body = json.dumps(answer, default=_plain)
        if access_log:
            log.info("200 %s %s: %d bytes in %.1f ms", request.method, request.url.path, len(body),
                     1000 * (time.monotonic() - started))
        return Response(body, media_type="application/json")

    from moa.pipelines.serving import openai_api

    openai_api.add_routes(app, scorer.service, model_name=model_name, limits=limits, workers=workers, work=work)
    return app


def load(model_uri: str, tracking_uri: str | None = None):
    import mlflow

    from moa.pipelines.tracking.store import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    return mlflow.pyfunc.load_model(model_uri)


def app_from_env():
    """uvicorn factory of each worker process: the settings of :func:`run` from ``$MOA_SERVE_CONFIG``."""
    from moa.pipelines.serving.openai_api import served_name

    config = json.loads(os.environ[ENV])
    log_to_stderr()  # a worker process of its own (workers > 1) has no logging set up yet
    return create_app(load(config["model_uri"], config.get("tracking_uri")), Limits(**config["limits"]),
                      docs=config["docs"], access_log=config.get("access_log", False),
                      model_name=served_name(config["model_uri"]))


def run(model_uri: str, *, host: str = "127.0.0.1", port: int = 5055, workers: int = 1,
        tracking_uri: str | None = None, limits: Limits | None = None, docs: bool = False,
        access_log: bool = False) -> None:
    """Serve until interrupted (``workers`` uvicorn processes, each with its own copy of the model)."""
    import uvicorn

    os.environ[ENV] = json.dumps({"model_uri": model_uri, "tracking_uri": tracking_uri, "docs": docs,
                                  "access_log": access_log, "limits": asdict(limits or Limits())})
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uvicorn.run("moa.pipelines.serving.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False, timeout_graceful_shutdown=5)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default, ``(default: ...)``, except where there is none (``None``, a flag
    that is off) or the help says it already; descriptions as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options (give the parser ``formatter_class=HelpFormatter`` to show their defaults)."""
    defaults = Limits()
    parser.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 exposes it")
    parser.add_argument("--port", type=int, default=5055, help="TCP port")
    parser.add_argument("--workers", type=int, default=1, help="server processes, each with the model loaded")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of the model (default: "
                        "$MLFLOW_TRACKING_URI, else ./mlflow.db; prefer the variable for credentials)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="larger bodies get 413")
    parser.add_argument("--max-rows", type=int, default=None, help="more rows per request get 413; unless given, "
                        f"{ROWS_PER_SECOND} per second of --timeout (default: {defaults.max_rows})")
    parser.add_argument("--timeout", type=float, default=defaults.timeout,
                        help="seconds of scoring per request; longer requests are stopped and get 503")
    parser.add_argument("--chunk-rows", type=int, default=defaults.chunk_rows,
                        help="rows per model call; the deadline is checked between chunks (and decode steps)")
    parser.add_argument("--max-generated-tokens", type=int, default=defaults.max_generated_tokens,
                        help="generation: more new tokens per request (rows x max_new_tokens) get 413")
    parser.add_argument("--scoring-threads", type=int, default=defaults.scoring_threads,
                        help="requests scored at once per server process (they take turns on the model)")
    parser.add_argument("--docs", action="store_true", help="serve interactive API docs at /docs")
    parser.add_argument("--access-log", action="store_true", help="log every answered request (INFO, stderr); "
                        "refused and failed ones are always logged")
    parser.add_argument("--engine", choices=("uvicorn", "ray"), default="uvicorn",
                        help="uvicorn worker processes on this machine, or Ray Serve replicas (see moa.pipelines.serving.ray_engine)")
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (--engine ray)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (--engine ray; default: start a "
                        "local one; 'auto': the cluster of this machine; ray://host:10001: a remote one)")


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(max_body_bytes=args.max_body_bytes, max_rows=args.max_rows, timeout=args.timeout,
                  chunk_rows=args.chunk_rows, max_generated_tokens=args.max_generated_tokens,
                  scoring_threads=args.scoring_threads)


def limit_arguments(limits: Limits) -> list[str]:
    """The command-line options of :func:`add_arguments` that give ``limits`` (for a server started as a process)."""
    return ["--max-body-bytes", str(limits.max_body_bytes), "--max-rows", str(limits.max_rows), "--timeout",
            str(limits.timeout), "--chunk-rows", str(limits.chunk_rows), "--max-generated-tokens",
            str(limits.max_generated_tokens), "--scoring-threads", str(limits.scoring_threads)]



def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread of this process; yields its URL and stops it on exit (tests,
    notebooks)."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="moa-server", daemon=True)
    thread.start()
    try:
        give_up = time.monotonic() + 60
        while not server.started:  # a bounded wait for uvicorn's startup
            if not thread.is_alive() or time.monotonic() > give_up:
                raise RuntimeError(f"the server on {host}:{port} did not start (see the log)")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
