"""Run by ``tests/test_ddp.py`` as ``python ddp_classifier_script.py OUT_DIR`` (Lightning re-runs it for rank 1).

A per-task :class:`MoAClassifier` fits one epoch with DDP on 2 CPU processes over gloo; the ranks validate on
shards of different sizes (7 and 17 rows). Rank 0 writes ``OUT_DIR/result.json``: what the module logged, the best
checkpoint's score, and the metrics of the whole validation set and of each shard, counted here from the trained
module's logits on one process.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader

from moa.pipelines.kinds.classifier.module import MoAClassifier

LABELS = {"a": ["x", "y"], "b": ["p", "q", "r"]}
RANK0_VAL_ROWS = 7


def make_rows(n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        task = int(torch.randint(2, (1,), generator=generator))
        label = int(torch.randint(len(LABELS["ab"[task]]), (1,), generator=generator))
        rows.append({"input_ids": torch.randint(1, 100, (8,), generator=generator),
                     "attention_mask": torch.ones(8, dtype=torch.long), "task_ids": torch.tensor(task),
                     "labels": torch.tensor(label)})
    return rows


def collate(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


class UnevenShards(L.LightningDataModule):
    """Named tasks and labels (what the per-task head is built from); each rank loads its own rows."""

    label_names = LABELS
    vocab_size = 100

    def __init__(self):
        super().__init__()
        self.train_rows, self.val_rows = make_rows(16, seed=1), make_rows(24, seed=2)

    def vocab(self) -> dict:
        return {"tasks": ["a", "b"], "domains": ["default"], "labels": LABELS}

    def shard(self, rank: int) -> list[dict]:
        return self.val_rows[:RANK0_VAL_ROWS] if rank == 0 else self.val_rows[RANK0_VAL_ROWS:]

    def train_dataloader(self):
        rank = self.trainer.global_rank  # 8 rows each: the ranks take the same number of steps
        return DataLoader(self.train_rows[rank * 8:(rank + 1) * 8], batch_size=4, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(self.shard(self.trainer.global_rank), batch_size=4, collate_fn=collate)


def counted(module: MoAClassifier, rows: list[dict]) -> dict[str, float]:
    """Loss, accuracy and per-task accuracy / macro-F1 of ``rows``, from the module's logits on one process."""
    batch = collate(rows)
    with torch.no_grad():
        logits = module(batch)
    preds, labels, tasks = logits.argmax(-1), batch["labels"], batch["task_ids"]
    out = {"val/loss": float(F.cross_entropy(logits, labels)), "val/accuracy": float((preds == labels).float().mean())}
    for index, task in enumerate(["a", "b"]):
        mine = tasks == index
        out[f"val/{task}/accuracy"] = float((preds[mine] == labels[mine]).float().mean())
        out[f"val/{task}/macro_f1"] = float(f1_score(labels[mine], preds[mine], average="macro"))
    return out


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    data = UnevenShards()
    module = MoAClassifier(n_experts=2, r=2, top_k=1, lr=1e-2)
    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir / "checkpoints", monitor="val/b/accuracy", mode="max")
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, use_distributed_sampler=False,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[best])
    trainer.fit(module, data)
    if trainer.global_rank != 0:
        return
    module.eval()
    result = {
        "logged": {name: float(value) for name, value in trainer.callback_metrics.items()},
        "best_score": float(best.best_model_score),
        "global": counted(module, data.val_rows),
        "shards": [counted(module, data.shard(rank)) for rank in (0, 1)],
        "world_size": trainer.world_size,
    }
    (out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
