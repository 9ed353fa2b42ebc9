"""A seeded multi-task token-classification data module for the router configs (no download, no tokenizer).

Each sample is a token sequence with a task id; its label depends on the task: every task splits the vocabulary
into its own "positive" and "negative" halves and the label says whether the sequence holds more positive than
negative tokens (a bag-of-words sentiment whose lexicon changes with the task). The same tokens mean different things in different tasks,
so adapters routed per task (or learned per token) help, and the data is identical for a given seed on every
machine and every DDP rank.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from moa.experts.errors import UserError


class _Rows(Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.tensors.items()}


class MultiTaskTokens(L.LightningDataModule):
    """Seeded multi-task sequence classification.

    Batches are dicts: ``input_ids [B, T]``, ``attention_mask [B, T]``, ``task_ids [B]``, ``domain_ids [B]`` (the
    same ids, for routers keyed on domains) and ``labels [B]``.

    Args:
        n_tasks: number of tasks (and domains).
        vocab_size: token ids lie in ``[1, vocab_size)`` (0 is padding); the model's vocabulary must be as large.
        seq_len: sequence length (the last tokens of some samples are padding).
        n_train, n_val, n_test: samples per split.
        batch_size: batch size of every loader.
        data_seed: the seed of the task definitions and the samples (not ``seed``: the model module has one).
    """

    def __init__(
        self,
        n_tasks: int = 4,
        vocab_size: int = 100,
        seq_len: int = 16,
        n_train: int = 1024,
        n_val: int = 256,
        n_test: int = 256,
        batch_size: int = 32,
        data_seed: int = 0,
    ):
        super().__init__()
        if n_tasks < 1 or vocab_size < 4 or seq_len < 2:
            raise UserError(
                f"need n_tasks >= 1, vocab_size >= 4 and seq_len >= 2; got n_tasks={n_tasks}, "
                f"vocab_size={vocab_size}, seq_len={seq_len}"
            )
        self.save_hyperparameters()
        self.n_tasks, self.vocab_size, self.seq_len = n_tasks, vocab_size, seq_len
        self.sizes = {"train": n_train, "val": n_val, "test": n_test, "predict": n_test}
        self.batch_size, self.data_seed = batch_size, data_seed
        g = torch.Generator().manual_seed(data_seed)
        # positive[t, v]: whether token v counts for the positive class in task t
        self.positive = torch.stack([torch.randperm(vocab_size - 1, generator=g) < (vocab_size - 1) // 2 for _ in range(n_tasks)])
        self.splits: dict[str, _Rows] = {}

    def make_split(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        """``n`` samples drawn with ``seed`` (independent of the other splits)."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, self.vocab_size, (n, self.seq_len), generator=g)
        lengths = torch.randint(self.seq_len // 2, self.seq_len + 1, (n,), generator=g)
        mask = (torch.arange(self.seq_len) < lengths[:, None]).long()
        ids = ids * mask
        tasks = torch.randint(0, self.n_tasks, (n,), generator=g)
        votes = ((self.positive[tasks[:, None], (ids - 1).clamp_min(0)].long() * 2 - 1) * mask).sum(1)
        labels = (votes > 0).long()
        return {"input_ids": ids, "attention_mask": mask, "task_ids": tasks, "domain_ids": tasks, "labels": labels}

    def setup(self, stage: str | None = None) -> None:
        for offset, split in enumerate(("train", "val", "test")):
            if split not in self.splits:
                self.splits[split] = _Rows(self.make_split(self.sizes[split], self.data_seed * 1000 + 17 * (offset + 1)))
        self.splits["predict"] = self.splits["test"]

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.splits:
            self.setup()
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
