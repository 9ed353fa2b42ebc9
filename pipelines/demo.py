"""The main job: the whole recommendation pipeline on embedded defaults, printed.

    python -m moa.pipelines.demo              # ./run main; about 10-15 min on a 2-core CPU
    python -m moa.pipelines.demo --full       # the larger configuration (2 adapted layers, 12 + 12 epochs)

1. MovieLens-100K in genre domains (each its own catalogue), leave-one-out per domain.
2. ``moa fit -c configs/recsys-experts.yaml``: domain experts (one LoRA expert per source domain in the top layer
   of all-MiniLM-L6-v2, static routing by domain) and one user encoder per domain; MLflow run on ./mlflow.db.
3. ``moa fit -c configs/recsys-xcross.yaml``: X-Cross for the target domain, integrating the frozen source experts
   layer by layer; the best epoch's bundle is logged as an MLflow pyfunc model, registered as
   ``moa-recommender`` and promoted to ``@champion`` when its validation NDCG@10 beats the champion's.
4. moa's scoring server (``moa serve``) for ``models:/moa-recommender@champion`` on 127.0.0.1: a mixed-domain
   batch of real users' histories, and a bad request; then the server is stopped.
5. Batch scoring of every user to Parquet, and the test metrics next to a popularity baseline.

The foundation tour that used to be the main job is ``python -m moa.pipelines.tour``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SOURCES, TARGET = ["comedy", "action", "drama"], "children"


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
    from moa.pipelines.cli import callback_override, run_cli

    return run_cli(["fit", "-c", str(CONFIGS / config), "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", *overrides,
                    *callback_override(CONFIGS / config, "moa.pipelines.tracking.LogBundle", **bundle)])


def shipped(cli):
    """The LogBundle callback of a fit: what it shipped (``metrics``, ``epoch``, ``promotion``)."""
    from moa.pipelines.tracking import LogBundle

    return next(c for c in cli.trainer.callbacks if isinstance(c, LogBundle))


def test_metrics(cli) -> dict[str, float]:
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {k: float(v) for k, v in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/main"), help="bundles, checkpoints, Parquet")
    parser.add_argument("--full", action="store_true", help="the larger configuration (2 adapted layers, 12 + 12 epochs)")
    parser.add_argument("--expert-epochs", type=int, default=None, help="epochs of stage 1 (default 2, --full 12)")
    parser.add_argument("--xcross-epochs", type=int, default=None, help="epochs of stage 2 (default 4, --full 12)")
    parser.add_argument("--encoder", default=None, help="item encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--name", default="moa-recommender", help="registered model name")
    args = parser.parse_args(argv)
    quiet()
    start = time.perf_counter()
    expert_epochs = args.expert_epochs or (12 if args.full else 2)
    xcross_epochs = args.xcross_epochs or (12 if args.full else 4)
    adapted = 2 if args.full else 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from moa.pipelines.tracking import resolve_tracking_uri

    print(f"MLflow store: {resolve_tracking_uri()} (artifacts under ./mlruns); outputs in {out}/")

    step("1. data: MovieLens-100K, genre domains, leave-one-out")
    from moa.recsys.data import ml100k

    dataset = ml100k()
    print(dataset.summary())
    print(f"source domains {SOURCES} (domain experts), target domain {TARGET!r} (X-Cross)")

    step(f"2. domain experts: {len(SOURCES)} LoRA experts in the top {adapted} MiniLM layer(s), {expert_epochs} epochs")
    common = ["--trainer.default_root_dir", str(out / "runs")]
    experts = fit("recsys-experts.yaml", [
        *common, "--trainer.max_epochs", str(expert_epochs), "--data.init_args.domains", str(SOURCES),
        "--model.init_args.adapted_layers", str(adapted),
        *(["--model.init_args.encoder", args.encoder] if args.encoder else [])], directory=str(out / "experts-bundle"))
    best = shipped(experts)
    print(f"best epoch {best.epoch}: val NDCG@10 {best.metrics['val/ndcg_10']:.4f}  HR@10 "
          f"{best.metrics['val/hr_10']:.4f} ({time.perf_counter() - start:.0f} s so far)")

    step(f"3. X-Cross for {TARGET!r} from the frozen {SOURCES} experts, {xcross_epochs} epochs; log, register, "
         "promotion gate")
    xcross = fit("recsys-xcross.yaml", [
        *common, "--trainer.max_epochs", str(xcross_epochs), "--data.init_args.domains", str([TARGET]),
        "--model.init_args.sources_from", str(out / "experts-bundle")], directory=str(out / "bundle"),
        register_as=args.name)
    best = shipped(xcross)
    print(f"best epoch {best.epoch}: val NDCG@10 {best.metrics['val/ndcg_10']:.4f}  HR@10 {best.metrics['val/hr_10']:.4f}")
    promotion = best.promotion
    verdict = "promoted to @champion" if promotion.promoted else "not promoted"
    print(f"registered {promotion.name} v{promotion.version}: {verdict} ({promotion.reason})")

    step("4. test metrics (leave-one-out, full ranking over each domain's catalogue, seen items masked)")
    from moa.recsys.baselines import Popularity
    from moa.recsys.evaluate import evaluate

    rows = []
    source_test, target_test = test_metrics(experts), test_metrics(xcross)
    for domain in [*SOURCES, TARGET]:
        split = (xcross if domain == TARGET else experts).datamodule.splits[domain]
        popular = evaluate(Popularity().fit(split), split.test, ks=(10,))
        ours = target_test if domain == TARGET else source_test
        model = "X-Cross" if domain == TARGET else "domain expert"
        rows.append((domain, model, ours[f"test/{domain}/ndcg_10"], ours[f"test/{domain}/hr_10"],
                     popular["NDCG@10"], popular["HR@10"]))
    print(f"{'domain':8s} {'model':14s} {'NDCG@10':>8s} {'HR@10':>7s} | {'popularity NDCG@10':>18s} {'HR@10':>7s}")
    for domain, model, ndcg, hr, pop_ndcg, pop_hr in rows:
        print(f"{domain:8s} {model:14s} {ndcg:8.4f} {hr:7.4f} | {pop_ndcg:18.4f} {pop_hr:7.4f}")

    step(f"5. REST: moa serve --model-uri models:/{args.name}@champion (127.0.0.1)")
    import pandas as pd

    from moa.pipelines.serving import ModelServer, post, request_body, score_all_users

    items = pd.read_parquet(out / "bundle" / "items.parquet")
    title = dict(zip(items["item_id"].astype(int), items["title"]))
    histories, domains, users = [], [], []
    for n, domain in enumerate([*SOURCES, TARGET]):
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
        status, reply = post(f"{server.url}/invocations", request_body([[histories[0][0], 99999]], ["comedy"], 5))
        print(f"a bad request (unknown item 99999): HTTP {status}: {reply['message'].splitlines()[-1]}")
        status, _ = post(f"{server.url}/invocations", request_body(histories[:1], domains[:1], k=3))
        print(f"the server keeps serving: HTTP {status}")
    print("server stopped")

    step("6. batch: top-10 for every user and domain to Parquet")
    result = score_all_users(f"models:/{args.name}@champion", out / "recommendations.parquet", k=10, dataset=dataset)
    print(f"wrote {len(result)} rows ({result['user_id'].nunique()} users x their domains) to "
          f"{out / 'recommendations.parquet'}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s; browse the runs with: mlflow ui --backend-store-uri "
          f"{resolve_tracking_uri()}")


if __name__ == "__main__":
    main()
