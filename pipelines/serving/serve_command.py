"""``moa serve``: serve a registered model (any kind) over REST until interrupted, with uvicorn worker processes
(:mod:`moa.pipelines.serving.server`) or Ray Serve replicas (:mod:`moa.pipelines.serving.ray_engine`).

    moa serve --name moa-recommender [--alias champion] [--port 5055] [--timeout 30]   # on 127.0.0.1
    python -m moa.pipelines.serving.serve_command --model-uri models:/moa-recommender@champion  # the server process

REST requests go to ``POST /invocations`` as MLflow's ``dataframe_split`` / ``dataframe_records`` JSON::

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
import os
from typing import Sequence

from moa.pipelines.serving import server
from moa.pipelines.serving.process import server_env
from moa.pipelines.serving.ray_engine import serve_on_ray


def serve(model_uri: str, args: argparse.Namespace) -> None:
    """Serve until interrupted with the engine, host, port and limits of the parsed ``args``."""
    if args.engine == "ray":
        serve_on_ray(model_uri, replicas=args.replicas, host=args.host, port=args.port, tracking_uri=args.tracking_uri,
                     limits=server.limits_of(args), docs=args.docs, address=args.ray_address)
    else:
        server.run(model_uri, host=args.host, port=args.port, workers=args.workers, tracking_uri=args.tracking_uri,
                   limits=server.limits_of(args), docs=args.docs, access_log=args.access_log)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``moa serve``: the model ``--model-uri``, else ``models:/<name>@<alias>``."""
    parser = argparse.ArgumentParser(prog="moa serve", description="Serve a registered model on 127.0.0.1 with "
                                     "moa's scoring server (see moa.pipelines.serving.server) until interrupted;\n"
                                     "refused and failed requests are logged to stderr.",
                                     formatter_class=server.HelpFormatter)
    parser.add_argument("--name", default="moa-recommender", help="registered model name")
    parser.add_argument("--alias", default="champion", help="alias of the version to serve")
    parser.add_argument("--model-uri", default=None, help="serve this URI instead of models:/<name>@<alias>")
    server.add_arguments(parser)
    args = parser.parse_args(argv)
    uri = args.model_uri or f"models:/{args.name}@{args.alias}"
    server.log_to_stderr()
    os.environ.update(server_env(args.tracking_uri))
    limits = server.limits_of(args)
    print(f"serving {uri} on http://{args.host}:{args.port} ({args.engine}; {limits}); POST /invocations, GET /ping",
          flush=True)
    serve(uri, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The server process (:class:`moa.pipelines.serving.process.ModelServer` starts it): ``--model-uri`` required,
    INFO logging to stderr."""
    parser = argparse.ArgumentParser(prog="python -m moa.pipelines.serving.serve_command", description=__doc__,
                                     formatter_class=server.HelpFormatter)
    parser.add_argument("--model-uri", required=True)
    server.add_arguments(parser)
    args = parser.parse_args(argv)
    server.log_to_stderr()
    print(f"moa server: {args.model_uri} on http://{args.host}:{args.port} ({args.engine}; {server.limits_of(args)})",
          flush=True)
    serve(args.model_uri, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
