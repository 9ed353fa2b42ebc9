"""REST serving benchmark: latency p50/p99 and throughput of ``moa serve`` (moa's scoring server) on the registered recommender.

    python bench/serving.py                                   # models:/moa-recommender@champion of ./mlflow.db
    python bench/serving.py --model-uri models:/rec@champion --requests 300

Starts the real server (``--env-manager local``, 127.0.0.1, one uvicorn worker) and sends ``/invocations``
requests built from real ml-100k users of the model's domains, over keep-alive HTTP connections:

* single: one user per request, sequential (latency of one recommendation);
* batched: B users of mixed domains per request, sequential (per-request latency and users/s);
* concurrent: C clients sending single-user requests at once (requests/s the server sustains).

If the model URI does not resolve (no main job has run here), a small stand-in is registered first: the real
recommender class with a tiny random encoder (serving cost does not depend on the encoder: item vectors are
cached in the bundle), into a temporary store.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def stand_in(root: Path) -> tuple[str, str]:
    """Register a tiny-encoder recommender over two domains; returns (model URI, tracking URI)."""
    import torch

    from moa.pipelines.kinds.recommender.module import tiny_encoder
    from moa.pipelines.tracking.registry import register_bundle
    from moa.pipelines.kinds.recommender.service import item_table, write_bundle
    from moa.recsys.data import ml100k
    from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender

    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    dataset = ml100k()
    domains = ["comedy", "action", "drama"]
    config = RecommenderConfig(encoder=str(tiny_encoder(root / "encoder")), adapted_layers=1)
    torch.manual_seed(0)
    model = TextSeqRecommender.build(domains, {d: dataset.domain(d).texts for d in domains}, config=config)
    bundle = write_bundle(root / "bundle", {"experts": model}, item_table(dataset, domains), metrics={"val/ndcg_10": 0.0})
    register_bundle(bundle, "bench-stand-in", tracking_uri=uri)
    return "models:/bench-stand-in@champion", uri


def user_rows(service, n: int, seed: int = 0) -> list[dict]:
    """``n`` request rows (history of source ids, domain) from real ml-100k users of the model's domains."""
    from moa.recsys.data import ml100k

    dataset = ml100k()
    rng = np.random.default_rng(seed)
    pools = []
    for domain in service.domains:
        part = dataset.domain(domain)
        ids = part.items["item_id"].astype(str)
        cast = int if service.integer_ids else str
        for seq in part.leave_one_out().sequences:
            history = [cast(ids.loc[i]) for i in seq[-50:].tolist()]
            pools.append({"history": history, "domain": domain})
    return [pools[i] for i in rng.integers(0, len(pools), n)]


class Client:
    def __init__(self, host: str, port: int):
        self.connection = http.client.HTTPConnection(host, port, timeout=120)

    def send(self, rows: list[dict], k: int) -> float:
        body = json.dumps({"dataframe_records": rows, "params": {"k": k}})
        start = time.perf_counter()
        self.connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:500]!r}")
        return elapsed


def bad_input_answers(url: str, good: dict) -> list[tuple[int, str]]:
    """(status, body) for a set of malformed requests: bad JSON, types, ids, sizes, content types, nesting."""
    from moa.pipelines.serving.client import post

    history, domain = good["history"], good["domain"]
    bodies = [
        ({"dataframe_records": [{"history": [999999999], "domain": domain}]}, "application/json"),
        ({"dataframe_records": [{"history": [], "domain": domain}]}, "application/json"),
        ({"dataframe_records": [{"history": history, "domain": "nope"}]}, "application/json"),
        ({"dataframe_records": [{"history": history, "domain": domain}], "params": {"k": 10**6}}, "application/json"),
        ({"dataframe_records": [{"history": history, "domain": domain}], "params": {"k": "ten"}}, "application/json"),
        ({"dataframe_records": [{"history": "1 2 3", "domain": domain}]}, "application/json"),
        ({"dataframe_records": [{"history": [["nested"]], "domain": domain}]}, "application/json"),
        ({"dataframe_records": [{"domain": domain}]}, "application/json"),
        ({"dataframe_records": "rows"}, "application/json"),
        ({"dataframe_split": {"columns": ["history"], "data": [[1, 2, 3]]}}, "application/json"),
        ({"rows": []}, "application/json"),
        ('{"dataframe_records": [', "application/json"),
        ("[" * 100_000 + "]" * 100_000, "application/json"),
        ("history,domain\n1,comedy\n", "text/csv"),
        ("{}", ""),
        ({"dataframe_records": [{"history": history, "domain": domain}] * 20_000}, "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
    ]
    return [post(f"{url}/invocations", body, content_type=kind) for body, kind in bodies]


def percentiles(seconds: list[float]) -> tuple[float, float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/moa-recommender@champion")
    parser.add_argument("--requests", type=int, default=300, help="single-user requests")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 128], help="users per batched request")
    parser.add_argument("--batch-requests", type=int, default=40, help="requests per batch size")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    import mlflow

    from moa.pipelines.serving.process import ModelServer
    from moa.pipelines.tracking.store import resolve_tracking_uri

    tracking, model_uri, note = resolve_tracking_uri(), args.model_uri, "registered model"
    temporary = None
    mlflow.set_tracking_uri(tracking)
    try:
        service = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().service
    except Exception as err:  # no such model in this store: register the stand-in
        print(f"{model_uri} not found in {tracking} ({type(err).__name__}); registering a tiny-encoder stand-in")
        temporary = tempfile.TemporaryDirectory()
        model_uri, tracking = stand_in(Path(temporary.name))
        mlflow.set_tracking_uri(tracking)
        service = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().service
        note = "stand-in (real recommender class, tiny encoder)"
    rows = user_rows(service, max(args.requests, max(args.batches) * 4))

    started = time.perf_counter()
    with ModelServer(model_uri, tracking_uri=tracking) as server:
        startup = time.perf_counter() - started
        client = Client(server.host, server.port)
        for i in range(10):  # warm-up
            client.send([rows[i]], args.k)
        single = [client.send([rows[i % len(rows)]], args.k) for i in range(args.requests)]
        batched = {}
        for size in args.batches:
            times = []
            for r in range(args.batch_requests):
                lo = (r * size) % (len(rows) - size)
                times.append(client.send(rows[lo:lo + size], args.k))
            batched[size] = times
        per_client = max(1, args.requests // args.clients)
        concurrent: list[float] = []
        lock = threading.Lock()

        def worker(offset: int) -> None:
            own = Client(server.host, server.port)
            local = [own.send([rows[(offset + i) % len(rows)]], args.k) for i in range(per_client)]
            with lock:
                concurrent.extend(local)

        wall = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(c * per_client,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
        bad = bad_input_answers(server.url, rows[0])

    import torch

    given = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python bench/serving.py {given}".rstrip() + f"   (in {Path.cwd()}, MLflow store {tracking})")
    print(f"model: {model_uri} ({note}); domains {service.domains}; k={args.k}; histories of up to 50 items")
    print(f"server: moa serve, 1 uvicorn worker, 127.0.0.1; start-up to /ping "
          f"{startup:.1f} s; client: keep-alive HTTP on the same machine; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    print()
    print(f"| {'workload':34s} | {'p50 ms':>8s} | {'p99 ms':>8s} | {'mean ms':>8s} | {'throughput':>16s} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 18}|")
    p50, p99, mean = percentiles(single)
    print(f"| {f'single user, sequential (n={len(single)})':34s} | {p50:8.1f} | {p99:8.1f} | {mean:8.1f} | "
          f"{len(single) / sum(single):10.1f} req/s |")
    for size, times in batched.items():
        p50, p99, mean = percentiles(times)
        print(f"| {f'{size} users/request, mixed domains':34s} | {p50:8.1f} | {p99:8.1f} | {mean:8.1f} | "
              f"{size * len(times) / sum(times):9.0f} users/s |")
    p50, p99, mean = percentiles(concurrent)
    print(f"| {f'single user, {args.clients} concurrent clients':34s} | {p50:8.1f} | {p99:8.1f} | {mean:8.1f} | "
          f"{len(concurrent) / wall:10.1f} req/s |")
    print(f"\nmedian of single-user latencies: {statistics.median(single) * 1e3:.1f} ms")
    fives = sum(status >= 500 for status, _ in bad)
    tracebacks = sum("Traceback" in (text if isinstance(text, str) else json.dumps(text)) for _, text in bad)
    print(f"bad-input set: {len(bad)} requests, {fives} answered 5xx, {tracebacks} with a traceback "
          f"(statuses {sorted({status for status, _ in bad})})")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
