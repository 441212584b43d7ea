"""Seeded draws of coalitions of training points (made on the generator's device, so equal on every device)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.estimators.sampling import uniform

__all__ = ["subsets_without", "with_point"]


def subsets_without(exclude: Tensor, sizes: Tensor, num_points: int, generator: torch.Generator | None) -> Tensor:
    """Uniform random subsets of ``0..N-1`` minus ``exclude[r]`` with ``sizes[r]`` members: (R,) -> index lists
    (R, max size) padded with ``-1``.

    Draws ``max size`` distinct indices per row by redrawing duplicates (sizes far below ``N``), or ranks uniform
    keys (sizes comparable to ``N``); either way every subset of the right size is equally likely.
    """
    rows, k = len(sizes), int(sizes.max()) if len(sizes) else 0
    device = sizes.device
    if k == 0:
        return torch.full((rows, 1), -1, dtype=torch.long, device=device)
    if 4 * k > num_points:
        keys = uniform((rows, num_points), generator, device)
        keys[torch.arange(rows, device=device), exclude] = 2.0  # ranked last: never drawn
        draw = keys.argsort(1)[:, :k]
    else:
        draw = (uniform((rows, k), generator, device) * (num_points - 1)).long()
        while True:
            ordered, where = draw.sort(1)
            dup = torch.zeros_like(draw, dtype=torch.bool)
            dup.scatter_(1, where[:, 1:], ordered[:, 1:] == ordered[:, :-1])
            if not bool(dup.any()):
                break
            fresh = (uniform((int(dup.sum()),), generator, device) * (num_points - 1)).long()
            draw[dup] = fresh
        draw = draw + (draw >= exclude.unsqueeze(1)).long()  # skip the excluded point
    keep = torch.arange(k, device=device) < sizes.unsqueeze(1)
    return torch.where(keep, draw, torch.full_like(draw, -1))


def with_point(subsets: Tensor, points: Tensor) -> Tensor:
    """Index lists (R, k) with ``points`` (R,) appended: (R, k + 1)."""
    return torch.cat([subsets, points.unsqueeze(1)], 1)
