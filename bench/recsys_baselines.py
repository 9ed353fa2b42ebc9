"""Popularity and ID-based SASRec on MovieLens-100K: the whole catalogue and each genre domain.

Protocol: time-ordered leave-one-out, test set, full ranking over the (domain's) catalogue with already-seen items
masked (the harness default); one SAMPLED 1+99 column for reference only. SASRec early-stops on validation NDCG@10.

    .venv/bin/python bench/recsys_baselines.py                       # prints and writes bench/results/recsys_baselines.txt
    .venv/bin/python bench/recsys_baselines.py --domains comedy --epochs 5   # a quick look
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from moa.recsys.baselines import Popularity, SASRec
from moa.recsys.data import ml100k
from moa.recsys.evaluate import evaluate, trainable_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="*", default=None,
                        help="'all' (the whole catalogue) and/or domain names; default: all + every domain")
    parser.add_argument("--epochs", type=int, default=200, help="SASRec epoch cap (early stopping, patience below)")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine: OpenMP threads spin-wait)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "recsys_baselines.txt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    full = ml100k()
    names = args.domains or ["all", *full.domains]
    say(f"# {' '.join(sys.argv)}")
    say(f"# torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}; "
        f"SASRec lr {args.lr}, batch {args.batch_size}, dropout {args.dropout}, epochs <= {args.epochs}, "
        f"patience {args.patience}, seed {args.seed}")
    say(f"# {full.summary()}")
    say("# test set, full ranking over the catalogue column's items, seen items masked; "
        "'sampled' = SAMPLED 1+99 uniform negatives (not comparable)")
    header = (f"{'catalogue':<10} {'users':>5} {'items':>5} {'model':<10} {'HR@10':>7} {'NDCG@10':>8} {'MRR@10':>7} "
              f"{'HR@20':>7} {'NDCG@20':>8} {'MRR@20':>7} {'HR@10 sampled':>13} {'params':>8} {'epochs':>6} "
              f"{'wall s':>7}")
    rows = []
    total = time.perf_counter()
    for name in names:
        data = full if name == "all" else full.domain(name)
        split = data.leave_one_out()
        say(f"## {split.summary()}")
        start = time.perf_counter()
        pop = Popularity().fit(split)
        rows.append(row(name, split, "popularity", pop, 0, time.perf_counter() - start))
        say(rows[-1])
        torch.manual_seed(args.seed)
        sasrec = SASRec(split.n_items, dropout=args.dropout)
        start = time.perf_counter()
        history = sasrec.fit(split, args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience,
                             seed=args.seed, log=lambda s: print(f"   {s}", flush=True))
        rows.append(row(name, split, "SASRec", sasrec, len(history), time.perf_counter() - start))
        say(rows[-1])
    say()
    say(header)
    for r in rows:
        say(r)
    say(f"# total wall time {time.perf_counter() - total:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


def row(name, split, label, model, epochs, seconds) -> str:
    m = evaluate(model, split.test)
    sampled = evaluate(model, split.test, negatives=99, seed=0)
    return (f"{name:<10} {split.n_users:>5} {split.n_items:>5} {label:<10} {m['HR@10']:>7.4f} {m['NDCG@10']:>8.4f} "
            f"{m['MRR@10']:>7.4f} {m['HR@20']:>7.4f} {m['NDCG@20']:>8.4f} {m['MRR@20']:>7.4f} "
            f"{sampled['HR@10']:>13.4f} {trainable_parameters(model):>8} {epochs:>6} {seconds:>7.1f}")


if __name__ == "__main__":
    main()
