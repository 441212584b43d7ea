"""Batches of whole groups (sharded over ranks by group) and the segments of consecutive group members in a batch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_batches", "segments"]


def group_batches(assignment: Tensor, batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """Batches of example positions that keep each group's members consecutive, for rank ``rank`` of ``world_size``.

    Rank ``r`` gets the groups ``g`` with ``g % world_size == r`` (for single examples, the identity grouping, that
    is examples ``r, r + world_size, ...``). Whole groups are packed into batches of at most ``batch_size`` examples;
    a larger group is split over consecutive batches (its partial sums add up).
    """
    assignment = torch.as_tensor(assignment).long().cpu()
    order = torch.sort(assignment, stable=True).indices  # by group, then position
    ids, counts = torch.unique_consecutive(assignment[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    owned = ids % world_size == rank
    order_list = order.tolist()
    batches: list[list[int]] = []
    current: list[int] = []
    for start, count in zip(starts[owned].tolist(), counts[owned].tolist()):
        members = order_list[start : start + count]
        if current and len(current) + len(members) > batch_size:
            batches.append(current)
            current = []
        while len(members) > batch_size:
            batches.append(members[:batch_size])
            members = members[batch_size:]
        current += members
        if len(current) == batch_size:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    return batches


def segments(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(bounds (R + 1,), groups (R,))`` of the runs of equal consecutive ids in ``group_ids`` (B,)."""
    ids = group_ids.cpu()
    change = torch.ones(len(ids), dtype=torch.bool)
    change[1:] = ids[1:] != ids[:-1]
    starts = change.nonzero().flatten()
    return torch.cat([starts, torch.tensor([len(ids)])]), ids[starts]
