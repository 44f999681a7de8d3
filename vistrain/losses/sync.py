"""Batch-wide loss normalisers in a DDP training step.

A detection loss divides by counts over the whole batch (the positives, the sum of target scores).  With the batch
split over N ranks each rank sees only its share, so the trainer wraps a DDP step's loss in :func:`synced`: inside,
:func:`batch_total` sums such a count over the ranks and :func:`world` is N.  A loss then divides its sums by
``batch_total(count) / world()`` and multiplies by ``batch * world()`` where it scales with the batch: DDP's average
of the ranks' gradients is the one-process gradient of the whole batch.  Outside :func:`synced` (one process,
validation) both are the identity, bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.distributed as dist

_SYNCED: ContextVar[bool] = ContextVar("vistrain_loss_synced", default=False)


@contextmanager
def synced(enabled: bool = True) -> Iterator[None]:
    """Normalisers summed over the ranks inside (when ``enabled`` and a process group of several ranks exists)."""
    on = bool(enabled) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    token = _SYNCED.set(on)
    try:
        yield
    finally:
        _SYNCED.reset(token)


def world() -> int:
    """The number of ranks sharing the batch inside :func:`synced`, else 1."""
    return dist.get_world_size() if _SYNCED.get() else 1


def batch_total(x: torch.Tensor) -> torch.Tensor:
    """``x`` (a count or sum over this rank's images) summed over the ranks inside :func:`synced` (detached, float);
    ``x`` itself outside.  Every rank must call it the same number of times in a step."""
    if not _SYNCED.get():
        return x
    x = x.detach().float().clone()
    dist.all_reduce(x)
    return x
