"""Cross-domain sequential recommendation on MovieLens-100K: domain LoRA experts, X-Cross, single LoRA, SASRec.

    python bench/recsys.py --threads 1 --out bench/results/recsys.txt   # 4 targets x 100/50/25 % of their users
    python bench/recsys.py --quick         # target children, 100/25 %, a few epochs: a smoke run
    python bench/recsys.py --head-epochs 40 --lora-epochs 8 --xcross-epochs 8 --sasrec-epochs 200 --patience 5
                                           # a longer run (about 3x the time)

Data: ml-100k from the installed recbole wheel, split into 4 genre domains (``moa.recsys.data.ML100K_DOMAINS``),
each its own catalogue; time-ordered leave-one-out; full ranking over the domain's items, seen items masked
(``moa.recsys.evaluate``); test metrics of the epoch with the best validation NDCG@10.

Models (``moa.recsys.recommender`` / ``moa.recsys.xcross``), all on all-MiniLM-L6-v2 (frozen), MoA pools (rank r LoRA on
query/value) in the top ``--adapted-layers`` layers, the layers below cached once per item:

* text, frozen encoder: the cached MiniLM item vectors and a trained user encoder (phase 1 of every text model);
* single LoRA: one LoRA expert trained with the user encoder on the target's (fraction of) data (phase 2);
* domain experts: the four single-LoRA-on-100 % experts in ONE pool with static routing by domain id;
* X-Cross: for a target, the three other domains' experts (frozen) as lock-step streams with the integrator;
  only the integrator and the target's user encoder train, on the target's (fraction of) data;
* SASRec (item-ID embeddings) and popularity (``moa.recsys.baselines``).

"wall s" is the training wall time of that model (both phases for the text models; for X-Cross without the
source experts' own training, which is the 100 % single-LoRA runs of the other domains). Timings vary by tens
of percent on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from moa.recsys.baselines import SASRec, Popularity
from moa.recsys.data import ml100k
from moa.recsys.evaluate import evaluate, trainable_parameters
from moa.recsys.encoders import load_encoder, plain_copy, tokenize_items
from moa.recsys.recommender import RecommenderConfig, TextSeqRecommender
from moa.recsys.xcross import build_xcross

METRICS = ("HR@10", "NDCG@10", "MRR@10")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="target children at 100/25 %%, a few epochs (smoke run)")
    p.add_argument("--targets", nargs="+", default=None, help="target domains (default: all four)")
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    p.add_argument("--adapted-layers", type=int, default=2, help="top MiniLM layers with MoA pools (of 6)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--max-tokens", type=int, default=20, help="tokens per item text")
    p.add_argument("--head-epochs", type=int, default=15, help="phase 1: user encoder on cached item vectors")
    p.add_argument("--lora-epochs", type=int, default=3, help="phase 2 of single LoRA: LoRA + user encoder")
    p.add_argument("--xcross-epochs", type=int, default=3, help="phase 2 of X-Cross: integrator + user encoder")
    p.add_argument("--sasrec-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3, help="user encoders in phase 1, and SASRec")
    p.add_argument("--phase2-lr", type=float, default=2e-3, help="user encoders in phase 2 (fine-tuning)")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--xcross-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=1.0, help="epochs of linear lr warmup in phase 2")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--negatives", type=int, default=256, help="uniform sampled negatives per batch (+ in-batch)")
    p.add_argument("--adapters-must-train", action="store_true",
                   help="phase 2 keeps its best epoch >= 1, never the untrained start (LoRA B = 0, integrator 0)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    if args.quick:  # shorter defaults; flags given explicitly win
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        quick = {"targets": ["children"], "fractions": [1.0, 0.25], "head_epochs": 8, "lora_epochs": 1,
                 "xcross_epochs": 1, "sasrec_epochs": 10, "patience": 2}
        for name, value in quick.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    return args


class Report:
    def __init__(self, path):
        self.lines, self.path = [], path

    def __call__(self, line=""):
        print(line, flush=True)
        self.lines.append(line)
        if self.path:
            with open(self.path, "w") as f:
                f.write("\n".join(self.lines) + "\n")


def row_metrics(model, split):
    result = evaluate(model, split.test, ks=(10,))
    return {k: result[k] for k in METRICS}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report(args.out)
    log = (lambda line: print("    " + line, flush=True))
    t0 = time.perf_counter()
    report(f"$ python bench/recsys.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    report(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
           f"(load average at start {os.getloadavg()[0]:.1f})")

    data = ml100k()
    domains = list(data.domains)
    targets = args.targets or domains
    for t in targets:
        if t not in domains:
            raise SystemExit(f"unknown target domain {t!r}; ml-100k domains: {domains}")
    report(data.summary())
    splits = {d: data.domain(d).leave_one_out() for d in domains}
    for d, s in splits.items():
        report(f"  {d:9s} {s.summary()}")

    config = RecommenderConfig(adapted_layers=args.adapted_layers, r=args.r, alpha=args.alpha,
                               max_tokens=args.max_tokens)
    backbone, tokenizer = load_encoder(config.encoder)
    start = time.perf_counter()
    tokens = {d: tokenize_items(data.domain(d).texts, tokenizer, config.max_tokens) for d in domains}
    report(f"item encoder all-MiniLM-L6-v2, MoA in the top {config.adapted_layers} of 6 layers on "
           f"{config.target_modules}, r={config.r}, alpha={config.alpha:g}; item texts <= {config.max_tokens} tokens "
           f"(tokenized once: {time.perf_counter() - start:.1f}s)")
    report(f"training: batch {args.batch_size} windows, in-batch + {args.negatives} sampled negatives; phase 1 <= "
           f"{args.head_epochs} epochs (cached vectors, lr {args.lr:g}); phase 2: LoRA <= {args.lora_epochs} epochs "
           f"(lr {args.lora_lr:g}), X-Cross <= {args.xcross_epochs} (lr {args.xcross_lr:g}, beta={args.beta:g}, "
           f"gamma={args.gamma:g}), user encoders lr {args.phase2_lr:g}, {args.warmup:g} warmup epoch(s); SASRec <= "
           f"{args.sasrec_epochs} epochs (lr {args.lr:g}); early stopping on validation NDCG@10 (patience "
           f"{args.patience}, SASRec {max(args.patience, 10)}); phase 2 "
           f"{'keeps its best trained epoch (>= 1)' if args.adapters_must_train else 'may keep its untrained start'}")
    report()

    caches: dict[str, TextSeqRecommender] = {}  # per domain: a model whose frozen-layer cache the others reuse

    def new_text_model(domain: str) -> TextSeqRecommender:
        model = TextSeqRecommender.build([domain], config=config, backbone=plain_copy(backbone))
        model.add_catalogue(domain, *tokens[domain])
        if domain in caches:
            model.item_encoder.share_cache(caches[domain].item_encoder, domain)
        else:
            start = time.perf_counter()
            model.item_encoder.prefix(domain)
            log(f"{domain}: frozen-layer cache of {model.item_encoder.n_items(domain)} items in "
                f"{time.perf_counter() - start:.1f}s")
            caches[domain] = model
        return model

    fit = dict(batch_size=args.batch_size, negatives=args.negatives, patience=args.patience, seed=args.seed)
    sasrec_fit = dict(lr=args.lr, patience=max(args.patience, 10), seed=args.seed)

    def train_single_lora(domain, split):
        model = new_text_model(domain)
        log(f"{domain}: phase 1 (user encoder on cached vectors)")
        p1 = model.fit(split, train_encoder=False, epochs=args.head_epochs, lr=args.lr, log=log, **fit)
        frozen = (row_metrics(model, split), model.parameter_counts()["heads"], p1["seconds"])
        log(f"{domain}: phase 2 (LoRA + user encoder)")
        p2 = model.fit(split, train_encoder=True, epochs=args.lora_epochs, lr=args.phase2_lr, encoder_lr=args.lora_lr,
                       warmup=args.warmup, keep_start=not args.adapters_must_train, log=log, **fit)
        return model, frozen, p1["seconds"] + p2["seconds"]

    def train_sasrec(split):
        start = time.perf_counter()
        model = SASRec(split.n_items)
        model.fit(split, epochs=args.sasrec_epochs, **sasrec_fit)
        return model, time.perf_counter() - start

    # ---- 1. every domain with all its users: popularity, SASRec, text (frozen), single LoRA -> domain experts
    in_domain, cross = [], []
    singles, single_seconds = {}, {}
    for d in domains:
        split = splits[d]
        log(f"== {d}: in-domain models (100 % users)")
        pop = Popularity().fit(split)
        in_domain.append((d, "popularity", row_metrics(pop, split), 0, 0.0))
        sas, seconds = train_sasrec(split)
        in_domain.append((d, "SASRec (item IDs)", row_metrics(sas, split), trainable_parameters(sas), seconds))
        if d in targets and 1.0 in args.fractions:
            cross.append((d, 1.0, "SASRec", in_domain[-1][2], trainable_parameters(sas), seconds))
        model, frozen, seconds = train_single_lora(d, split)
        in_domain.append((d, "text, frozen MiniLM", *frozen))
        singles[d] = model
        single_seconds[d] = seconds
        lora_row = (row_metrics(model, split), model.parameter_counts()["total"], seconds)
        in_domain.append((d, "text + single LoRA", *lora_row))
        if d in targets and 1.0 in args.fractions:
            cross.append((d, 1.0, "single LoRA", *lora_row))
        log(f"{d}: done at {time.perf_counter() - t0:.0f}s")

    start = time.perf_counter()
    experts = TextSeqRecommender.from_experts(singles).eval()
    pack_seconds = time.perf_counter() - start
    counts = experts.parameter_counts()
    for d in domains:  # the whole pool (4 experts + 4 user encoders); time = the four single runs + packing
        in_domain.append((d, "domain experts (1 pool)", row_metrics(experts, splits[d]), counts["total"],
                          sum(single_seconds.values()) + pack_seconds))

    # ---- 2. per target domain and fraction of its training users: SASRec, single LoRA, X-Cross
    for target in targets:
        for fraction in args.fractions:
            split = splits[target] if fraction == 1.0 else splits[target].with_train_fraction(fraction, args.seed)
            log(f"== target {target}, {fraction:.0%} of the training users ({len(split.train_user_positions)})")
            if fraction != 1.0:
                sas, seconds = train_sasrec(split)
                cross.append((target, fraction, "SASRec", row_metrics(sas, split), trainable_parameters(sas), seconds))
                model, _, seconds = train_single_lora(target, split)
                cross.append((target, fraction, "single LoRA", row_metrics(model, split),
                              model.parameter_counts()["total"], seconds))
                del model
            xmodel = build_xcross(experts, target, beta=args.beta, gamma=args.gamma)
            log(f"{target}: X-Cross phase 1 (user encoder on cached integrated vectors)")
            p1 = xmodel.fit(split, train_encoder=False, epochs=args.head_epochs, lr=args.lr, log=log, **fit)
            log(f"{target}: X-Cross phase 2 (integrator + user encoder; sources {xmodel.item_encoder.sources})")
            p2 = xmodel.fit(split, train_encoder=True, epochs=args.xcross_epochs, lr=args.phase2_lr,
                            encoder_lr=args.xcross_lr, warmup=args.warmup, keep_start=not args.adapters_must_train,
                            log=log, **fit)
            cross.append((target, fraction, "X-Cross", row_metrics(xmodel, split),
                          xmodel.parameter_counts()["total"], p1["seconds"] + p2["seconds"]))
            del xmodel
        log(f"target {target}: done at {time.perf_counter() - t0:.0f}s")

    # ---- report
    head = f"{'domain':9s} {'model':26s} {'HR@10':>7s} {'NDCG@10':>8s} {'MRR@10':>7s} {'trainable':>10s} {'wall s':>7s}"
    report("In-domain (test, full ranking over the domain's items, seen masked; 100 % of the training users)")
    report(head)
    report("-" * len(head))
    for d, name, m, params, seconds in in_domain:
        report(f"{d:9s} {name:26s} {m['HR@10']:7.4f} {m['NDCG@10']:8.4f} {m['MRR@10']:7.4f} {params:10,d} {seconds:7.1f}")
    report()
    report("X-Cross experiment: target domain, share of its training users (validation/test: all users)")
    head = f"{'target':9s} {'users':>5s} {'model':12s} {'HR@10':>7s} {'NDCG@10':>8s} {'MRR@10':>7s} {'trainable':>10s} {'wall s':>7s}"
    report(head)
    report("-" * len(head))
    order = {"SASRec": 0, "single LoRA": 1, "X-Cross": 2}
    cross.sort(key=lambda row: (targets.index(row[0]), -row[1], order[row[2]]))
    for target, fraction, name, m, params, seconds in cross:
        report(f"{target:9s} {fraction:5.0%} {name:12s} {m['HR@10']:7.4f} {m['NDCG@10']:8.4f} {m['MRR@10']:7.4f} "
               f"{params:10,d} {seconds:7.1f}")
    report()
    lora_full = {t: m for t, f, n, m, _, _ in cross if n == "single LoRA" and f == 1.0}
    for fraction in args.fractions:
        xs = [(t, m) for t, f, n, m, _, _ in cross if n == "X-Cross" and f == fraction and t in lora_full]
        if xs:
            ratio = sum(m["NDCG@10"] for _, m in xs) / max(sum(lora_full[t]["NDCG@10"] for t, _ in xs), 1e-12)
            report(f"X-Cross with {fraction:.0%} of the target users / single LoRA with 100 %: "
                   f"NDCG@10 ratio {ratio:.3f} (summed over {len(xs)} targets)")
    report(f"total wall time {time.perf_counter() - t0:.0f}s (load average at the end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
