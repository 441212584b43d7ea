"""Reverse mode inside a data-parallel training loop, Lightning-free: the record of one optimizer step gathered from
every process, and the backward sweep split over processes by measurement.

Recording. Under data parallelism an optimizer step is the sum of every process's micro-batch gradients (each row's
weight ``1 / (B * A * W)``, see :mod:`lightning_attr.distributional.tracking`), so the record a replay needs is the
GLOBAL step: :func:`gather_step` collects every process's micro-batches (dataset indices and row weights) of one step,
rank 0's first, on every process. Each (process, micro-batch) stays its own recorded micro-batch, so a replay
recomputes batch norm statistics over the same rows as training did. One process can then replay the whole run.

Sweeping. The adjoint of each measurement is independent of the others, so the Q measurement columns are dealt out
round robin (:func:`measurement_shares`): each process sweeps its share over the whole recorded run, and
:func:`sweep_in_shares` gathers the shares so every process holds the same (N, Q) result. A process left without a
column (Q < W) sweeps one column again and discards it: every process computes for the same time, so none waits in a
collective for a whole sweep (which could outlast the process group's timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_attr.distributional.reverse import RecordedBatch

__all__ = ["AllGather", "gather_step", "measurement_shares", "sweep_in_shares"]

AllGather = Callable[[Tensor], Tensor]  # a tensor (same shape on every process) -> (W, *shape), rank order


def _pack(batches: Sequence[RecordedBatch]) -> Tensor:
    """``[A, B_1 .. B_A, indices .., weights ..]`` as one float64 vector (indices are exact below 2**53)."""
    sizes = [len(b.indices) for b in batches]
    parts = [torch.tensor([len(batches), *sizes], dtype=torch.float64)]
    parts += [b.indices.detach().cpu().double() for b in batches] + [b.weights.detach().cpu().double() for b in batches]
    return torch.cat(parts)


def _unpack(packed: Tensor) -> list[RecordedBatch]:
    a = int(packed[0])
    sizes = [int(s) for s in packed[1:1 + a].tolist()]
    total, start = sum(sizes), 1 + a
    indices = packed[start:start + total].round().long().split(sizes)
    weights = packed[start + total:start + 2 * total].split(sizes)
    return [RecordedBatch(i.clone(), w.clone()) for i, w in zip(indices, weights)]


def gather_step(batches: Sequence[RecordedBatch], all_gather: AllGather | None = None,
                device: torch.device | str | None = None) -> list[RecordedBatch]:
    """Every process's micro-batches of one optimizer step, rank by rank (rank 0's first), on CPU (indices int64,
    weights float64). Each process passes its own ``batches`` (any number, any sizes) and ``all_gather``; two
    collectives (the packed sizes, then the record padded to the largest) on ``device`` (a CUDA device for NCCL).
    ``all_gather=None``: one process, its batches as they are."""
    if not batches:
        raise ValueError("`batches` is empty: an optimizer step needs at least one micro-batch on every process.")
    mine = [RecordedBatch(b.indices.detach().to("cpu", torch.long), b.weights.detach().to("cpu", torch.float64))
            for b in batches]
    if all_gather is None:
        return mine
    packed = _pack(mine).to(device or "cpu")
    sizes = all_gather(torch.tensor([packed.numel()], device=packed.device)).reshape(-1).tolist()
    padded = torch.zeros(int(max(sizes)), dtype=packed.dtype, device=packed.device)
    padded[:packed.numel()] = packed
    rows = all_gather(padded).cpu()
    return [b for rank, size in enumerate(sizes) for b in _unpack(rows[rank, :int(size)])]


def measurement_shares(num_measurements: int, world_size: int) -> list[list[int]]:
    """The measurement columns each rank sweeps: rank r owns ``r, r + W, ...``; a rank that owns none (Q < W) sweeps
    column ``r % Q`` as well (computed, then discarded)."""
    if num_measurements < 1 or world_size < 1:
        raise ValueError(f"need at least one measurement and one process, got num_measurements={num_measurements}, "
                         f"world_size={world_size}.")
    return [list(range(r, num_measurements, world_size)) or [r % num_measurements] for r in range(world_size)]


def sweep_in_shares(sweep: Callable[[list[int]], Tensor], num_measurements: int, rank: int = 0, world_size: int = 1,
                    all_gather: AllGather | None = None) -> Tensor:
    """(N, Q) on every process: this rank runs ``sweep(columns) -> (N, len(columns))`` on its share
    (:func:`measurement_shares`); the shares are gathered (one collective) and put back in column order."""
    shares = measurement_shares(num_measurements, world_size)
    mine = sweep(shares[rank])
    if mine.dim() != 2 or mine.shape[1] != len(shares[rank]):
        raise ValueError(f"`sweep` must return (N, {len(shares[rank])}) for columns {shares[rank][:5]}, got "
                         f"{tuple(mine.shape)}.")
    if world_size == 1:
        return mine
    if all_gather is None:
        raise ValueError(f"`all_gather` is required with world_size={world_size}.")
    width = max(len(s) for s in shares)
    padded = mine.new_zeros(mine.shape[0], width)
    padded[:, :mine.shape[1]] = mine
    gathered = all_gather(padded)  # (W, N, width)
    out = mine.new_empty(mine.shape[0], num_measurements)
    for r in range(min(world_size, num_measurements)):
        owned = range(r, num_measurements, world_size)
        out[:, r::world_size] = gathered[r][:, :len(owned)]
    return out
