"""Samplers that make training reproducible and resumable and evaluation exact under DDP."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """This rank's share of a shuffled epoch, reproducible from (seed, epoch), able to start mid-epoch.

    Every rank draws the same permutation (seeded by seed + epoch) and takes every world_size-th index, padded
    by wrapping around so ranks see equally many samples (DDP needs equal step counts). `skip` drops the first
    samples of this rank's share: a run resumed after k batches continues with batch k + 1.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("the training split is empty")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.shuffle = shuffle
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.num_samples))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices()[self.skip :])

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)


class ShardSampler(Sampler[int]):
    """Evaluation split across ranks without padding: every image is seen exactly once in total."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
