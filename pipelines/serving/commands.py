"""Serve a registered model (any kind) over REST, or score a file of rows in batch.

    moa serve --name moa-recommender [--alias champion] [--port 5055] [--timeout 30]   # on 127.0.0.1
    moa batch --model-uri models:/my-classifier@champion --input rows.jsonl --out answers.parquet
    moa batch --model-uri models:/moa-recommender@champion --out recs.parquet [--k 10]  # every user of ml-100k

``moa serve`` runs moa's own scoring server (:mod:`moa.pipelines.serving.server`: FastAPI + uvicorn, the registered pyfunc
model loaded with ``mlflow.pyfunc.load_model``). REST requests go to ``POST /invocations`` as MLflow's
``dataframe_split`` / ``dataframe_records`` JSON::

    {"dataframe_records": [{"history": [50, 172, 181], "domain": "action"},
                           {"history": [1, 71], "domain": "children"}],
     "params": {"k": 5}}
    -> {"predictions": [{"items": [...], "scores": [...]}, {"items": [...], "scores": [...]}]}

Errors are ``{"error_code", "message"}`` without traceback: 400 for bad requests (the message names the row and
the problem), 413 over the body or row limit, 415 without a JSON Content-Type, 503 past the per-request timeout
(the work is stopped); the server keeps serving.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from moa.pipelines.tracking.callbacks import resolve_tracking_uri
from moa.experts.errors import UserError

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_env(tracking_uri: str | None = None) -> dict[str, str]:
    """Environment of a model server: the tracking URI, and this interpreter's scripts (uvicorn) on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": resolve_tracking_uri(tracking_uri),
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class ModelServer:
    """moa's scoring server (:mod:`moa.pipelines.serving.server`) for ``model_uri`` on a loopback port, as a context manager.

    ``start()`` returns once ``/ping`` answers (or raises with the server's log); ``stop()`` ends the server's
    process group. The server runs in its own process group, with the tracking URI in its environment only
    (``MLFLOW_TRACKING_URI``: a URI may hold credentials, and a command line is visible to every user). ``limits``
    (a :class:`moa.pipelines.serving.server.Limits`) sets the body, row and time limits; ``docs`` turns on ``/docs``;
    ``engine="ray"`` serves with ``replicas`` Ray Serve replicas on a local Ray cluster the server starts.
    """

    def __init__(self, model_uri: str, *, port: int | None = None, host: str = HOST, tracking_uri: str | None = None,
                 workers: int = 1, log_path: str | Path | None = None, startup_timeout: float = 180.0,
                 limits=None, docs: bool = False, engine: str = "uvicorn", replicas: int = 2):
        from moa.pipelines.serving.server import Limits

        self.model_uri, self.host, self.port = model_uri, host, port or free_port(host)
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.workers, self.startup_timeout = workers, startup_timeout
        self.limits, self.docs = limits or Limits(), docs
        self.engine, self.replicas = engine, replicas
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        from moa.pipelines.serving.server import limit_arguments

        return [sys.executable, "-m", "moa.pipelines.serving.server", "--model-uri", self.model_uri, "--host", self.host,
                "--port", str(self.port), "--workers", str(self.workers), *limit_arguments(self.limits),
                "--engine", self.engine, "--replicas", str(self.replicas), *(["--docs"] if self.docs else [])]

    def start(self) -> "ModelServer":
        env = server_env(self.tracking_uri)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), env=env, stdout=self._log or subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the model server exited with code {self.process.returncode} before answering; "
                                   f"{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"the model server did not answer /ping within {self.startup_timeout:.0f} s; {self._tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no server log kept: pass log_path)"
        return "server log tail:\n" + self.log_path.read_text(errors="replace")[-3000:]

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def post(url: str, body: bytes | str | dict, timeout: float = 60.0,
         content_type: str = "application/json") -> tuple[int, Any]:
    """POST to ``url``; returns ``(status, parsed JSON or text)``, for error statuses too."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def request_body(histories: Sequence[Sequence], domains: Sequence[str], k: int | None = None) -> dict:
    """The ``/invocations`` JSON for rows of (history, domain), with ``k`` as a param."""
    body: dict[str, Any] = {"dataframe_records": [{"history": list(h), "domain": d} for h, d in zip(histories, domains)]}
    if k is not None:
        body["params"] = {"k": k}
    return body


def serve_main(argv: Sequence[str] | None = None) -> int:
    import moa.pipelines.serving.server as server

    parser = argparse.ArgumentParser(prog="moa serve", description="Serve a registered model on 127.0.0.1 with "
                                     "moa's scoring server (see moa.pipelines.serving.server) until interrupted.")
    parser.add_argument("--name", default="moa-recommender", help="registered model name")
    parser.add_argument("--alias", default="champion", help="alias to serve")
    parser.add_argument("--model-uri", default=None, help="serve this URI instead of models:/<name>@<alias>")
    server.add_arguments(parser)
    args = parser.parse_args(argv)
    uri = args.model_uri or f"models:/{args.name}@{args.alias}"
    os.environ.update(server_env(args.tracking_uri))
    limits = server.limits_of(args)
    print(f"serving {uri} on http://{args.host}:{args.port} ({args.engine}; {limits}); POST /invocations, GET /ping",
          flush=True)
    server.serve(uri, args)
    return 0


def user_histories(dataset, items: pd.DataFrame, max_history: int) -> pd.DataFrame:
    """Each user's history (source item ids) within each domain, oldest first, cut to its newest ``max_history``
    items (the service refuses longer ones): columns user_id, domain, history."""
    inter = dataset.interactions.sort_values("timestamp", kind="stable")  # equal times keep the dataset's order
    source_ids = dataset.items["item_id"].astype(str)
    frame = pd.DataFrame({"user_id": inter["user_id"].to_numpy(),
                          "item_id": source_ids.loc[inter["item"].to_numpy()].to_numpy()})
    domain_of = dict(zip(items["item_id"].astype(str), items["domain"]))
    frame["domain"] = frame["item_id"].map(domain_of)
    frame = frame.dropna(subset=["domain"])
    grouped = frame.groupby(["user_id", "domain"], sort=True)["item_id"].agg(lambda s: list(s)[-max_history:])
    return grouped.reset_index().rename(columns={"item_id": "history"})


def score_all_users(model_uri: str, out: str | Path, *, k: int = 10, dataset=None, batch_size: int = 512,
                    tracking_uri: str | None = None) -> pd.DataFrame:
    """Top-``k`` recommendations for every (user, domain) of ``dataset`` (default: ml-100k) with the registered
    model, from each user's newest ``max_history`` items (the bundle's limit), written whole or not at all by
    :func:`write_table` (Parquet, or ``.jsonl`` / ``.csv`` by the extension; columns user_id, domain, items,
    scores). Items take their domain from the model's item table, so any dataset of the items the model serves
    works."""
    import mlflow

    from moa.recsys.data import ml100k

    out = Path(out)
    output_format(out)  # a bad --out before the scoring, not after
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    model = mlflow.pyfunc.load_model(model_uri)
    service = model.unwrap_python_model().service
    dataset = dataset if dataset is not None else ml100k()
    items = pd.DataFrame([(str(i), d) for d, ids in service.index_of.items() for i in ids], columns=["item_id", "domain"])
    frame = user_histories(dataset, items, service.max_history)
    if service.integer_ids:
        frame["history"] = frame["history"].map(lambda h: [int(i) for i in h])
    outputs = []
    for lo in range(0, len(frame), batch_size):
        outputs.append(model.predict(frame.iloc[lo:lo + batch_size][["history", "domain"]].reset_index(drop=True),
                                     params={"k": k}))
    result = pd.concat([frame[["user_id", "domain"]].reset_index(drop=True),
                        pd.concat(outputs, ignore_index=True)], axis=1)
    write_table(result, out)
    return result


def conform(frame: pd.DataFrame, model) -> pd.DataFrame:
    """Rows read from a file, typed as the model's input schema wants: numbers from text cells (CSV), lists from
    JSON text (``"[1, 2]"``) or space-separated ids; empty cells are missing."""
    schema = model.metadata.get_input_schema()
    if schema is None:
        return frame
    frame = frame.copy()
    for spec in schema.inputs:
        if spec.name not in frame.columns:
            continue
        column = frame[spec.name]
        kind = str(getattr(spec.type, "name", spec.type))
        if kind in ("double", "float", "long", "integer") and column.dtype == object:
            frame[spec.name] = pd.to_numeric(column.replace("", None), errors="coerce")
            if kind in ("long", "integer") and frame[spec.name].notna().all():
                frame[spec.name] = frame[spec.name].astype("int64")
        elif spec.type.__class__.__name__ == "Array":
            frame[spec.name] = column.map(_as_sequence)
    return frame


def _as_sequence(value: Any):
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [int(v) if v.lstrip("-").isdigit() else v for v in text.split()]
    return value.tolist() if hasattr(value, "tolist") else value


def output_format(path: Path) -> str:
    """The output's extension, ``.parquet``, ``.jsonl`` or ``.csv``; a ``UserError`` for any other."""
    ext = path.suffix.lower()
    if ext not in (".parquet", ".jsonl", ".csv"):
        raise UserError(f"--out {path}: write .parquet, .jsonl or .csv")
    return ext


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """``.parquet``, ``.jsonl`` or ``.csv`` (lists as JSON text) by the file's extension; written whole or not at
    all (:func:`moa.atomic.atomic_file`: a temporary file beside it, fsynced and renamed into place)."""
    from moa.atomic import atomic_file

    ext = output_format(path)
    with atomic_file(path) as tmp:
        if ext == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif ext == ".jsonl":
            frame.to_json(tmp, orient="records", lines=True, default_handler=str)
        else:
            plain = frame.apply(lambda c: c.map(lambda v: json.dumps(v.tolist() if hasattr(v, "tolist") else v)
                                                if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v))
            plain.to_csv(tmp, index=False)


def score_rows(model, frame: pd.DataFrame, params: dict | None = None, *, batch_size: int = 256,
               progress: bool = True) -> pd.DataFrame:
    """The model's answers for every row, ``batch_size`` rows per call, with a progress bar on stderr; the
    input columns are kept (an answer column whose name an input column has is written ``predicted_<name>``)."""
    from mlflow.exceptions import MlflowException
    from tqdm.auto import tqdm

    from moa.pipelines.serving.server import shift_rows

    outputs = []
    with tqdm(total=len(frame), unit="row", desc="scoring", disable=not progress, file=sys.stderr,
              mininterval=1.0) as bar:
        for lo in range(0, len(frame), batch_size):
            part = frame.iloc[lo:lo + batch_size].reset_index(drop=True)
            try:
                outputs.append(pd.DataFrame(model.predict(part, params=params or None)))
            except MlflowException as error:
                raise UserError(shift_rows(error.message, lo)) from None
            bar.update(len(part))
    answers = pd.concat(outputs, ignore_index=True)
    answers.columns = [f"predicted_{c}" if c in frame.columns else c for c in answers.columns]
    return pd.concat([frame.reset_index(drop=True), answers], axis=1)


def _params(pairs: Sequence[str]) -> dict[str, Any]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--param {pair!r}: write name=value, e.g. --param k=5")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def batch_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moa batch", description="Score a file of rows with a registered model "
                                     "(any kind) and write the answers beside the rows; for a recommender without "
                                     "--input, the top-k for every user of a dataset.")
    parser.add_argument("--model-uri", default="models:/moa-recommender@champion")
    parser.add_argument("--input", type=Path, default=None, help="rows to score: .jsonl, .json, .csv, .tsv or "
                        ".parquet with the model's input columns (see the model's signature)")
    parser.add_argument("--out", type=Path, default=Path("predictions.parquet"), help=".parquet, .jsonl or .csv")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a request param for every row, e.g. k=10 or max_new_tokens=32 (repeatable)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per model call")
    parser.add_argument("--k", type=int, default=None, help="recommenders: the same as --param k=K")
    parser.add_argument("--data", default=None, help="recommenders without --input: the RecBole atomic dataset "
                        "folder whose users to score (<name>.inter; default: ml-100k from the installed recbole wheel)")
    parser.add_argument("--data-name", default=None, help="the dataset files' stem (default: the folder's name)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="score in this process, or with Ray Data over a Ray cluster (see moa.pipelines.serving.ray_engine)")
    parser.add_argument("--workers", type=int, default=2, help="model copies scoring in parallel (--engine ray)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (--engine ray; default: a local one)")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    params = _params(args.param)
    output_format(args.out)  # a bad --out before any work
    if args.k is not None:
        params["k"] = args.k
    if args.input is None:
        from moa.recsys.data import load_atomic, ml100k

        folder = Path(args.data) if args.data else None
        if folder is None or (args.data_name in (None, "ml-100k") and (folder / "ml-100k.inter").is_file()):
            dataset = ml100k(folder)
        else:  # any atomic dataset: each item's domain comes from the served bundle's item table
            dataset = load_atomic(folder, args.data_name)
        result = score_all_users(args.model_uri, args.out, k=params.get("k", 10), dataset=dataset,
                                 tracking_uri=args.tracking_uri)
        print(f"wrote {len(result)} rows ({result['user_id'].nunique()} users) to {args.out}")
        return 0
    import mlflow

    from moa.pipelines.data.text import read_table

    if not args.input.is_file():
        raise FileNotFoundError(f"--input {args.input}: no such file")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    frame = read_table(args.input)
    if frame.empty:
        raise UserError(f"--input {args.input}: no rows")
    if args.engine == "ray":
        from moa.pipelines.serving.ray_engine import score_rows_on_ray

        result = score_rows_on_ray(args.model_uri, frame, params, workers=args.workers, batch_size=args.batch_size,
                                   address=args.ray_address, tracking_uri=args.tracking_uri)
    else:
        mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri))
        model = mlflow.pyfunc.load_model(args.model_uri)
        result = score_rows(model, conform(frame, model), params, batch_size=args.batch_size)
    write_table(result, args.out)
    print(f"wrote {len(result)} rows to {args.out}")
    return 0
