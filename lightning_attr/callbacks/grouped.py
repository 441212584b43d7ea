"""Grouped (GGDA) attribution passes: the grouping pre-pass and batches that hold whole groups, sharded by group."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.parameters import last_linear

__all__ = ["group_batches", "segments", "grouping_inputs"]


def group_batches(assignment: Tensor, batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """Batches of example indices that keep each group's members consecutive.

    Rank ``r`` gets the groups ``g`` with ``g % world_size == r``. Whole groups are packed into batches of at most
    ``batch_size`` examples; a larger group is split over consecutive batches (its partial sums add up).
    """
    order = torch.argsort(assignment * len(assignment) + torch.arange(len(assignment)))  # by group, then index
    groups = assignment[order]
    batches, current = [], []
    for g in torch.unique(groups).tolist():
        if g % world_size != rank:
            continue
        members = order[groups == g].tolist()
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


def grouping_inputs(method: str, module: nn.Module, loader: DataLoader, unpack: Callable[[Any], tuple],
                    column: str | None, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example inputs a grouper needs, for this rank's shard: ``(indices, {"labels", "features", "column"})``.

    ``embedding_kmeans``: the classifier layer's inputs (penultimate features); ``gradient_kmeans``: the classifier
    layer's per-example loss gradients ``g a^T`` flattened; ``column``: the batch entry ``column`` (integers).
    """
    head = dict(module.named_modules())[last_linear(module)] if method.endswith("kmeans") else None
    grads = GradientFeaturizer(module, last_layer=True) if method == "gradient_kmeans" else None
    seen: list[Tensor] = []
    handle = head.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().flatten(1))) \
        if method == "embedding_kmeans" else None
    idx, out = [], {"labels": [], "features": [], "column": []}
    try:
        for batch in loader:
            x, y, i = unpack(batch)
            x, y = x.to(device), y.to(device)
            idx.append(i)
            out["labels"].append(y.cpu())
            if method == "embedding_kmeans":
                seen.clear()
                with torch.no_grad():
                    module(x)
                out["features"].append(seen[-1].float().cpu())
            elif method == "gradient_kmeans":
                a, g = grads.factors(x, y)
                out["features"].append(torch.einsum("bo,bi->boi", g, a).flatten(1).cpu())
            if method == "column":
                if not isinstance(batch, dict) or column not in batch:
                    raise ValueError(f"`group_column`={column!r} is not a key of the batches "
                                     f"({sorted(batch) if isinstance(batch, dict) else type(batch).__name__}).")
                values = torch.as_tensor(batch[column])
                if values.dtype.is_floating_point or values.shape != (len(i),):
                    raise ValueError(f"`group_column`={column!r} must hold one integer per example, got dtype "
                                     f"{values.dtype}, shape {tuple(values.shape)}.")
                out["column"].append(values)
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(idx), {k: torch.cat(v) for k, v in out.items() if v}
