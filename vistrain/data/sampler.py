"""Training samples as a function of ``(seed, epoch, index)``, so that a resumed run repeats the uninterrupted one.

The sampler yields :class:`SampleKey` ``(index, epoch)`` instead of a bare index; a dataset with random augmentation
draws every random number of a sample from :func:`sample_rng` (numpy) or :func:`sample_torch_seed` (torch), seeded by
``(seed, epoch, index)``.  Nothing then depends on which process loads a sample, on how many workers there are, or
on what earlier epochs drew: an epoch restarted from a checkpoint gets the same batches bit for bit.  The order of
an epoch is a permutation seeded by ``(seed, epoch)``, as ``DistributedSampler.set_epoch`` does.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch


class SampleKey(NamedTuple):
    """What a training loader asks a dataset for: sample ``index`` as drawn in ``epoch``."""

    index: int
    epoch: int


def split_key(key) -> tuple[int, int]:
    """``SampleKey`` or a plain index (epoch 0) -> ``(index, epoch)``."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), 0


def sample_seed_sequence(seed: int, epoch: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) % 2**63, int(epoch), int(index)])


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The numpy generator of one training sample: a function of ``(seed, epoch, index)`` only."""
    return np.random.default_rng(sample_seed_sequence(seed, epoch, index))


def sample_torch_seed(seed: int, epoch: int, index: int) -> int:
    """A torch seed for one training sample (for transforms that draw from torch's global generator)."""
    return int(sample_seed_sequence(seed, epoch, index).generate_state(1, np.uint64)[0] >> np.uint64(1))


class EpochSampler(torch.utils.data.Sampler):
    """Indices ``0..n-1`` as :class:`SampleKey`, shuffled by a generator seeded with ``seed + epoch``
    (or in order, ``shuffle=False``).  Call :meth:`set_epoch` before each epoch.

    In a DDP run of ``num_replicas`` processes, rank ``rank`` takes places ``rank, rank + num_replicas, ...`` of
    that order (padded with its first indices to a multiple of ``num_replicas``, as ``DistributedSampler``), so
    the ranks' k-th batches of ``batch / num_replicas`` together hold the one-process run's k-th batch."""

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.num_samples, self.shuffle, self.seed, self.epoch = int(num_samples), shuffle, int(seed), 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.num_samples))
        else:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.num_replicas > 1 and order:
            total = len(self) * self.num_replicas
            order = (order * (total // len(order) + 1))[:total][self.rank::self.num_replicas]
        return order

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = self.epoch
        return iter([SampleKey(i, epoch) for i in self.order()])

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)
