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
import errno
import os
import socket
from typing import Sequence

from moa.experts.errors import UserError

from moa.pipelines.serving import server
from moa.pipelines.serving.process import server_env
from moa.pipelines.serving.ray_engine import serve_on_ray


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port the server could not listen on, before anything is loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closing socket is no user
            sock.bind(address)
    except OSError as error:
        taken = error.errno == errno.EADDRINUSE
        raise UserError(f"port {port} on {host} is taken (another server?): stop it or serve with --port <another>"
                        if taken else f"cannot serve on {host}:{port}: {error.strerror or error}") from None


def serve(model_uri: str, args: argparse.Namespace) -> None:
    """Serve until interrupted with the engine, host, port and limits of the parsed ``args``."""
    if args.engine == "ray":
        serve_on_ray(model_uri, replicas=args.replicas, host=args.host, port=args.port, tracking_uri=args.tracking_uri,
                     limits=server.limits_of(args), docs=args.docs, access_log=args.access_log,
                     address=args.ray_address)
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
    check_port(args.host, args.port)  # before the registry is read or anything loaded
    server.log_to_stderr()
    os.environ.update(server_env(args.tracking_uri))
    from moa.pipelines.tracking.registry import check_model_uri

    check_model_uri(uri, args.tracking_uri)  # an unknown model, version or alias: one line, before any worker starts
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
    check_port(args.host, args.port)
    print(f"moa server: {args.model_uri} on http://{args.host}:{args.port} ({args.engine}; {server.limits_of(args)})",
          flush=True)
    serve(args.model_uri, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
