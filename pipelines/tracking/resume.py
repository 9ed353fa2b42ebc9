"""Exact resume: :class:`ResumeState` puts the RNG states, the position in the epoch and the MLflow run id in
every checkpoint, so that a fit resumed from one (even mid-epoch) continues exactly, in the same MLflow run.
Checkpoints are read as data only (:func:`load_checkpoint`); :func:`checkpoint_run_id` is the run a checkpoint
came from."""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from moa.experts.errors import UserError
from moa.pipelines.tracking.logger import mlflow_logger

RESUME_KEY = "moa_resume"  # the checkpoint entry of ResumeState


class ResumeState(Callback):
    """Exact resume, mid-epoch included, in the same MLflow run (always on in ``moa fit``).

    Lightning checkpoints the weights, optimizers and loop counters but not the random state, and it restarts an
    interrupted epoch's loader from its first batch unless the loader is stateful. This callback adds to every
    checkpoint (entry ``moa_resume``) the torch (CPU and CUDA), numpy and Python RNG states, the RNG states the
    epoch's train loader iterator was made from (its shuffle order and worker seeds come from them), the batches
    done in the epoch, and the MLflow run id. Resuming, it remakes the epoch's iterator from those states, skips
    the batches done (loading them: no sampler internals) and sets the checkpoint's RNG states, so the run goes
    on as if it had not stopped; the CLI logs to the checkpoint's MLflow run when the store has it.

    Assumes no hook draws random numbers between the start of an epoch and its first batch. Under DDP only rank
    0's RNG states are saved (every rank resumes from them).
    """

    def __init__(self):
        self._epoch_rng: dict[str, Any] | None = None  # RNG states the current epoch's train iterator came from
        self._iterator_made = False  # the current epoch's iterator exists (made before on_train_epoch_start)
        self._batches = 0
        self._restore: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning makes the first epoch's iterator after this hook (the sanity check keeps the RNG state)
        self._epoch_rng, self._iterator_made = rng_states(), True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state, self._restore = self._restore, None
        fetcher = trainer.fit_loop._data_fetcher
        if state is None or fetcher is None:
            return
        mid_epoch = state["epoch"] == trainer.current_epoch and 0 < state["batches"] < trainer.num_training_batches
        if mid_epoch:  # the epoch's iterator again, then past the batches done
            set_rng_states(state["epoch_rng"])
            iter(fetcher)
            fetched = fetcher.fetched
            for _ in range(state["batches"]):
                next(fetcher)
            fetcher.fetched = fetched  # Lightning adds the batches done itself
            self._epoch_rng, self._batches = state["epoch_rng"], state["batches"]
            set_rng_states(state["rng"])
        else:  # at an epoch's end: the next epoch's iterator, as the run made it after the checkpoint
            set_rng_states(state["rng"])
            self._epoch_rng = rng_states()
            iter(fetcher)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._iterator_made:  # Lightning makes this epoch's iterator after this hook
            self._epoch_rng = rng_states()
        self._iterator_made, self._batches = False, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._batches += 1  # before ModelCheckpoint's hook: Lightning runs checkpoint callbacks last

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._iterator_made = False

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        logger = mlflow_logger(trainer)
        checkpoint[RESUME_KEY] = {
            "rng": rng_states(), "epoch_rng": self._epoch_rng, "epoch": trainer.current_epoch,
            "batches": self._batches, "mlflow_run_id": logger.run_id if logger is not None else None,
        }

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restore = checkpoint.get(RESUME_KEY) if trainer.training else None
        if self._restore is not None:  # this callback makes the epoch resumable
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")


def rng_states() -> dict[str, Any]:
    """The torch (CPU, CUDA), numpy and Python RNG states (the keys Lightning uses), in types
    ``torch.load(weights_only=True)`` reads: numpy's key array as a tensor."""
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype("int64")), *rest),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the RNG states :func:`rng_states` returned (CUDA's only where it was recorded)."""
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda"):
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    if "numpy" in states:
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), *rest))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


def load_checkpoint(path: str | os.PathLike, **kwargs) -> dict[str, Any]:
    """A checkpoint file read as data only (``torch.load(weights_only=True)``: tensors, numbers, strings and
    containers, never a pickled object, whose loading could run code); a :class:`UserError` naming the problem
    for a file that holds other objects or is no checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise UserError(f"the checkpoint {path} holds a pickled object ({found.group(1)}), which moa does not "
                            "load: loading it could run code") from None
        first = " ".join(str(error).split())[:200]
        raise UserError(f"{path} is not a readable checkpoint: {first}") from None


def checkpoint_run_id(ckpt_path: str | os.PathLike | None) -> str | None:
    """The MLflow run id :class:`ResumeState` recorded in a checkpoint file (None without one); read as data only
    (:func:`load_checkpoint`: a checkpoint with a pickled object is refused before Lightning loads it)."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return None
    checkpoint = load_checkpoint(ckpt_path, mmap=True)
    resume = checkpoint.get(RESUME_KEY) if isinstance(checkpoint, dict) else None
    return resume.get("mlflow_run_id") if isinstance(resume, dict) else None

