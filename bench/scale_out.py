"""Scale-out on Ray against one process, in one run: batch scoring (``moa batch`` vs ``moa batch --engine ray``) and
REST serving with concurrent clients (1 uvicorn worker vs Ray Serve replicas), on a local Ray cluster.

    python bench/scale_out.py                       # 6000 batch rows; Ray with 1 and 2 workers; 8 clients x 40 requests
    python bench/scale_out.py --rows 1000 --workers 2 --clients 4 --requests 20

The model is the registered recommender stand-in of ``bench/serving.py`` (the real recommender class with a tiny
encoder, rows from real ml-100k users). Batch times are the wall time of each command as a user runs it (a
subprocess: imports, Ray start-up and model loads included); rate = rows / wall; Ray runs once per ``--workers``
count (the replicas of the serving part: the largest). Serving: ``--clients`` threads each send ``--requests``
single-user requests over a keep-alive connection; throughput = all requests / wall time; p50 / p99 over every
request.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import Client, percentiles, stand_in, user_rows  # noqa: E402  (bench/serving.py)


def batch_wall(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def serve_load(model_uri: str, tracking: str, rows: list[dict], clients: int, requests: int, **server) -> dict:
    from moa.pipelines.serving.process import ModelServer

    with ModelServer(model_uri, tracking_uri=tracking, startup_timeout=600, **server) as running:
        warm = Client(running.host, running.port)
        for i in range(20):
            warm.send([rows[i]], 10)
        latencies: list[float] = []
        lock = threading.Lock()

        def worker(offset: int) -> None:
            own = Client(running.host, running.port)
            local = [own.send([rows[(offset + i) % len(rows)]], 10) for i in range(requests)]
            with lock:
                latencies.extend(local)

        threads = [threading.Thread(target=worker, args=(c * requests,)) for c in range(clients)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
    p50, p99, _ = percentiles(latencies)
    return {"rps": len(latencies) / wall, "p50": p50, "p99": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6000, help="rows of the batch job")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="requests per client")
    parser.add_argument("--workers", default="1,2", help="Ray Data model copies, one batch run per count "
                        "(comma-separated); Ray Serve replicas: the largest")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_uri, tracking = stand_in(root)
        mlflow.set_tracking_uri(tracking)
        service = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().service
        rows = user_rows(service, max(args.rows, args.clients * args.requests + 20))
        pd.DataFrame(rows[: args.rows]).to_parquet(root / "rows.parquet")
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
        moa = str(Path(sys.executable).with_name("moa"))
        base = [moa, "batch", "--model-uri", model_uri, "--input", str(root / "rows.parquet"), "--param", "k=10"]
        local = batch_wall([*base, "--out", str(root / "local.parquet")], env)
        items = pd.read_parquet(root / "local.parquet")["items"].map(list)
        ray, same = {}, True
        for n in workers:
            out = root / f"ray-{n}.parquet"
            ray[n] = batch_wall([*base, "--out", str(out), "--engine", "ray", "--workers", str(n)], env)
            same &= items.equals(pd.read_parquet(out)["items"].map(list))
        uvicorn = serve_load(model_uri, tracking, rows, args.clients, args.requests)
        replicas = serve_load(model_uri, tracking, rows, args.clients, args.requests, engine="ray",
                              replicas=max(workers))
    print(f"command: python bench/scale_out.py {' '.join(sys.argv[1:])}".rstrip()
          + f"   ({os.cpu_count()} CPUs; recommender stand-in; local Ray cluster)")
    print(f"\nbatch, {args.rows} rows (wall of the whole command; answers identical: {same}):")
    print(f"  {'moa batch (one process)':37s} {local:7.1f} s  {args.rows / local:7.0f} rows/s")
    for n, wall in ray.items():
        name = f"moa batch --engine ray, {n} worker{'s' if n > 1 else ''}"
        print(f"  {name:37s} {wall:7.1f} s  {args.rows / wall:7.0f} rows/s   {local / wall:.2f}x one process")
    print(f"\nserving, {args.clients} concurrent clients x {args.requests} single-user requests:")
    for name, r in (("moa serve, 1 uvicorn worker", uvicorn),
                    (f"moa serve --engine ray, {max(workers)} replicas", replicas)):
        print(f"  {name:38s} {r['rps']:7.1f} req/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms")


if __name__ == "__main__":
    main()
