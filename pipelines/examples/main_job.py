"""The main job: the whole recommendation pipeline on embedded defaults, printed.

    python -m moa.pipelines.examples.main_job              # ./run main; about 4 min on a 2-core CPU
    python -m moa.pipelines.examples.main_job --sasrec     # also SASRec (item IDs), to its best epoch, tested the same way
    python -m moa.pipelines.examples.main_job --epochs 20  # longer (the benchmark's models peak after 13 to 26 epochs)

1. MovieLens-100K in genre domains (each its own catalogue), leave-one-out per domain.
2. ``moa fit -c configs/recsys-experts.yaml`` on the four domains: moa's best recommender of
   ``bench/recsys_quality.py``: item ID + all-MiniLM-L6-v2 text vectors with one LoRA expert per domain in the top
   MiniLM layer, trained end to end, one user encoder per domain, full softmax (``--frozen``: no experts, the
   cheaper model). Lightning keeps the
   best validation epoch; ``LogBundle`` logs its bundle to the MLflow run (./mlflow.db), registers it as
   ``moa-recommender`` and promotes it to ``@champion`` only if its validation NDCG@10 beats the champion's.
3. Test metrics per domain next to popularity (and SASRec with ``--sasrec``): same split, full ranking, seen
   items masked.
4. moa's scoring server (``moa serve``) for ``models:/moa-recommender@champion`` on 127.0.0.1: a mixed-domain
   batch of real users' histories, and a bad request; then the server is stopped.
5. Batch scoring of every user to Parquet.

X-Cross (``configs/recsys-xcross.yaml``) trains from this bundle of domain LoRA experts:
``moa fit -c configs/recsys-xcross.yaml --model.init_args.sources_from outputs/main/bundle``. The foundation tour that used to be the main job is
``python -m moa.pipelines.examples.tour``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DOMAINS = ["children", "comedy", "action", "drama"]


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def quiet() -> None:
    """Keep the output to the pipeline's own lines (libraries configure their loggers on import: import first)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401
    import mlflow  # noqa: F401
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fit(config: str, overrides: list[str], **bundle):
    """``moa fit -c configs/<config>`` with ``overrides``; ``bundle`` updates the config's LogBundle callback."""
    from moa.pipelines.cli.lightning_cli import callback_override, run_cli

    return run_cli(["fit", "-c", str(CONFIGS / config), "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", *overrides,
                    *callback_override(CONFIGS / config, "moa.pipelines.tracking.log_bundle.LogBundle", **bundle)])


def shipped(cli):
    """The LogBundle callback of a fit: what it shipped (``metrics``, ``epoch``, ``promotion``)."""
    from moa.pipelines.tracking.log_bundle import LogBundle

    return next(c for c in cli.trainer.callbacks if isinstance(c, LogBundle))


def test_metrics(cli) -> dict[str, float]:
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {k: float(v) for k, v in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/main"), help="bundle, checkpoints, Parquet")
    parser.add_argument("--epochs", type=int, default=5, help="most epochs (the best validation epoch is kept)")
    parser.add_argument("--frozen", action="store_true", help="no LoRA experts: frozen MiniLM text vectors")
    parser.add_argument("--sasrec", action="store_true",
                        help="also SASRec (item IDs), trained to its best validation epoch (about 2 more minutes)")
    parser.add_argument("--encoder", default=None, help="item encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--name", default="moa-recommender", help="registered model name")
    args = parser.parse_args(argv)
    quiet()
    start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from moa.pipelines.tracking.store import resolve_tracking_uri

    print(f"MLflow store: {resolve_tracking_uri()} (artifacts under ./mlruns); outputs in {out}/")

    step("1. data: MovieLens-100K, genre domains, leave-one-out")
    from moa.recsys.data import ml100k

    dataset = ml100k()
    print(dataset.summary())

    adapters = not args.frozen
    model = "ID + text" + (" + LoRA experts" if adapters else " (frozen MiniLM)")
    step(f"2. {model}: <= {args.epochs} epochs on {DOMAINS}; log, register, promotion gate")
    recommender = fit("recsys-experts.yaml", [
        "--trainer.default_root_dir", str(out / "runs"), "--trainer.max_epochs", str(args.epochs),
        "--data.init_args.domains", str(DOMAINS), "--model.init_args.train_encoder", str(adapters).lower(),
        "--model.init_args.adapted_layers", "1" if adapters else "0",
        *(["--model.init_args.encoder", args.encoder] if args.encoder else [])],
        directory=str(out / "bundle"), register_as=args.name)
    best = shipped(recommender)
    print(f"best epoch {best.epoch}: val NDCG@10 {best.metrics['val/ndcg_10']:.4f}  HR@10 "
          f"{best.metrics['val/hr_10']:.4f} ({time.perf_counter() - start:.0f} s so far)")
    promotion = best.promotion
    verdict = "promoted to @champion" if promotion.promoted else "not promoted"
    print(f"registered {promotion.name} v{promotion.version}: {verdict} ({promotion.reason})")

    step("3. test metrics (leave-one-out, full ranking over each domain's catalogue, seen items masked)")
    from moa.recsys.baselines import Popularity, SASRec
    from moa.recsys.evaluate import evaluate

    ours = test_metrics(recommender)
    columns = ["moa", "popularity", *(["SASRec"] if args.sasrec else [])]
    print(f"{'domain':9s} " + " ".join(f"{c + ' NDCG@10':>18s} {'HR@10':>6s}" for c in columns))
    for domain in DOMAINS:
        split = recommender.datamodule.splits[domain]
        row = [(ours[f"test/{domain}/ndcg_10"], ours[f"test/{domain}/hr_10"])]
        baselines = [Popularity().fit(split)]
        if args.sasrec:
            sasrec = SASRec(split.n_items)
            sasrec.fit(split, patience=3, progress=False)  # to its best validation epoch (the benchmark's setting)
            baselines.append(sasrec)
        for baseline in baselines:
            result = evaluate(baseline, split.test, ks=(10,))
            row.append((result["NDCG@10"], result["HR@10"]))
        print(f"{domain:9s} " + " ".join(f"{n:18.4f} {h:6.4f}" for n, h in row), flush=True)

    step(f"4. REST: moa serve --model-uri models:/{args.name}@champion (127.0.0.1)")
    import pandas as pd

    from moa.pipelines.serving.batch import score_all_users
    from moa.pipelines.serving.client import post, request_body
    from moa.pipelines.serving.process import ModelServer

    items = pd.read_parquet(out / "bundle" / "items.parquet")
    title = dict(zip(items["item_id"].astype(int), items["title"]))
    histories, domains, users = [], [], []
    for n, domain in enumerate(DOMAINS):
        part = dataset.domain(domain)
        split = part.leave_one_out()
        ids = part.items["item_id"].astype(int)
        histories.append([int(ids.loc[i]) for i in split.sequences[10 * n][-8:].tolist()])
        domains.append(domain)
        users.append(split.users[10 * n])
    started = time.perf_counter()
    with ModelServer(f"models:/{args.name}@champion", log_path=out / "server.log") as server:
        print(f"server up at {server.url} in {time.perf_counter() - started:.1f} s")
        t0 = time.perf_counter()
        status, reply = post(f"{server.url}/invocations", request_body(histories, domains, k=5))
        print(f"POST /invocations, {len(histories)} users of {len(set(domains))} domains in one request: HTTP {status} in "
              f"{(time.perf_counter() - t0) * 1e3:.0f} ms")
        for user, domain, history, prediction in zip(users, domains, histories, reply["predictions"]):
            print(f"  user {user} ({domain}), recently: {'; '.join(title[i] for i in history[-3:])}")
            for item, score in zip(prediction["items"], prediction["scores"]):
                print(f"      {score:7.3f}  {title[item]}")
        status, reply = post(f"{server.url}/invocations", request_body([[histories[1][0], 99999]], ["comedy"], 5))
        print(f"a bad request (unknown item 99999): HTTP {status}: {reply['message'].splitlines()[-1]}")
        status, _ = post(f"{server.url}/invocations", request_body(histories[:1], domains[:1], k=3))
        print(f"the server keeps serving: HTTP {status}")
    print("server stopped")

    step("5. batch: top-10 for every user and domain to Parquet")
    result = score_all_users(f"models:/{args.name}@champion", out / "recommendations.parquet", k=10, dataset=dataset)
    print(f"wrote {len(result)} rows ({result['user_id'].nunique()} users x their domains) to "
          f"{out / 'recommendations.parquet'}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s; browse the runs with: mlflow ui --backend-store-uri "
          f"{resolve_tracking_uri()}")


if __name__ == "__main__":
    main()
