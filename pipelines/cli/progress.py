"""Progress as plain lines, for output that is not a terminal (a log file, ``nohup``, CI): :class:`PlainProgress`.

A progress bar redraws one line in place, which a file records as nothing useful; ``moa fit|validate|test``
use this instead when stdout is not a terminal (unless the config names a progress bar), one line a step:

    epoch 0  batch 50/200  step 50  train/loss=0.6931  12.3 it/s
    epoch 0  validation at step 200: val/loss=0.6012
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import ProgressBar

from moa.experts.errors import UserError


class PlainProgress(ProgressBar):
    """A line every ``every_n_steps`` training batches or ``every_n_seconds`` (whichever comes first) and at the end
    of each epoch: epoch, batch, step, the progress-bar metrics (e.g. ``train/loss``) and batches per second since
    the last line; a line after each validation with its metrics.

    Args:
        every_n_steps: a line every this many training batches.
        every_n_seconds: and at least this often (seconds) while batches run.
    """

    def __init__(self, every_n_steps: int = 50, every_n_seconds: float = 30.0):
        super().__init__()
        if every_n_steps < 1 or every_n_seconds <= 0:
            raise UserError(f"PlainProgress needs every_n_steps >= 1 and every_n_seconds > 0, got {every_n_steps}, "
                            f"{every_n_seconds}")
        self.every_n_steps, self.every_n_seconds = every_n_steps, every_n_seconds
        self._enabled = True
        self._mark: tuple[float, int] | None = None  # (time, batches done) at the last line
        self._total: float = float("inf")  # the epoch's batches, read at its start (Lightning's count then shrinks
        # by the steps done when max_steps ends the epoch early)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark, self._total = None, self.total_train_batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._mark is None:  # the epoch's first batch run (not 0 in an epoch resumed midway)
            self._mark = (time.monotonic(), batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._enabled:
            return
        now, done = time.monotonic(), batch_idx + 1
        last_time, last_done = self._mark
        if done % self.every_n_steps and now - last_time < self.every_n_seconds and done != self._total:
            return
        rate = (done - last_done) / max(now - last_time, 1e-9)
        total = "?" if self._total == float("inf") else int(self._total)
        self.print(f"epoch {trainer.current_epoch}  batch {done}/{total}  step {trainer.global_step}  "
                   f"{self._metrics(trainer, pl_module, 'train/')}{rate:.1f} it/s", flush=True)
        self._mark = (now, done)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._enabled and not trainer.sanity_checking:
            self.print(f"epoch {trainer.current_epoch}  validation at step {trainer.global_step}: "
                       f"{self._metrics(trainer, pl_module, 'val/').strip()}", flush=True)

    def on_test_end(self, trainer, pl_module) -> None:
        if self._enabled:
            self.print(f"test: {self._metrics(trainer, pl_module, 'test/').strip()}", flush=True)

    def _metrics(self, trainer, pl_module, prefix: str) -> str:
        values: dict[str, Any] = self.get_metrics(trainer, pl_module)
        shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items() if k.startswith(prefix))
        return "".join(f"{item}  " for item in shown)
