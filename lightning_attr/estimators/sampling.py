"""Seeded sampling and numeric helpers shared by the Monte-Carlo estimators (and by patch-masking training)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["uniform", "random_subsets_of_size", "solve"]


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws of ``shape`` made on the generator's device (so a CPU generator gives the same draws
    for CUDA ``x``), then moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def random_subsets_of_size(sizes: Tensor, d: int, generator: torch.Generator | None) -> Tensor:
    """Uniformly random subsets with given sizes: ``sizes`` (...,) -> boolean masks (..., d)."""
    ranks = uniform((*sizes.shape, d), generator, sizes.device).argsort(-1).argsort(-1)
    return ranks < sizes.unsqueeze(-1)


def solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """Batched least-norm solve of ``matrix (..., n, n) @ out = rhs (..., n, k)`` in float64 (works for singular
    sample matrices)."""
    return torch.linalg.pinv(matrix.double()) @ rhs.double()
