"""Samplers for attribution and evaluation passes."""

from __future__ import annotations

from typing import Iterator

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["UnpaddedDistributedSampler"]


class UnpaddedDistributedSampler(DistributedSampler):
    """In-order shard ``rank::world_size`` of a dataset without the padding duplicates of ``DistributedSampler``.

    Ranks may get one example more than others, so every example is counted exactly once by metrics that reduce
    across ranks. Lightning leaves a ``DistributedSampler`` subclass in place.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
