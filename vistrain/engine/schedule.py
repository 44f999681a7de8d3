"""Warmup and gradient accumulation over a run: which batches warm up, how many batches make an optimizer step,
and the first batch that steps (pure functions of the run's sizes, shared by the trainer and its checks)."""

from __future__ import annotations

import numpy as np


def warmup_iterations(warmup_epochs: float, epochs: int, batches_per_epoch: int) -> int:
    """Batches of lr / momentum / accumulation warmup, as ultralytics 8.4: ``warmup_epochs`` of them, leaving at
    least the final epoch without.  (YOLOv5 and ultralytics < 8.4 also warmed up for at least 100 batches: on
    400 images at batch 16 that is 4 epochs instead of 3.)"""
    warmup_epochs = min(warmup_epochs, max(epochs - 1, 0))
    return round(warmup_epochs * batches_per_epoch) if warmup_epochs > 0 else 0


def warmup_accumulate(ni: int, warmup_iters: int, nbs: int, batch_size: int) -> int:
    """Batches per optimizer step at warmup batch ``ni``: ramps from 1 to ``nbs / batch_size``."""
    return max(1, int(np.interp(ni, [0, warmup_iters], [1, nbs / batch_size]).round()))


def first_step_batch(start_epoch: int, epochs: int, batches_per_epoch: int, warmup_iters: int, nbs: int,
                     batch_size: int, last_opt_step: int = -1) -> int | None:
    """The run-wide batch index ``ni`` of the first optimizer step the run will take, or None if it takes none.

    Mirrors ``Trainer.train_epoch``: warmup sets the accumulation for ``ni <= warmup_iters``, and a step
    follows batch ``ni`` when ``ni - last_opt_step >= accumulate``.  Stops at the first step, so it costs at
    most about ``nbs / batch_size`` iterations."""
    accumulate = max(round(nbs / batch_size), 1)
    for ni in range(start_epoch * batches_per_epoch, epochs * batches_per_epoch):
        if ni <= warmup_iters:
            accumulate = warmup_accumulate(ni, warmup_iters, nbs, batch_size)
        if ni - last_opt_step >= accumulate:
            return ni
    return None
