"""What the callbacks report, computed apart from how they log it: noisy-label detection from self-influence, and
the top-k proponents / opponents of tracked queries as rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_attr.evaluation import noisy_label_recall, recall_at
from lightning_attr.influence.groups import Grouping
from lightning_attr.influence.topk import TopK
from lightning_attr.metrics.noisy_label import noisy_label_auc

__all__ = ["noisy_label_metrics", "topk_rows", "noisy_mask"]


def noisy_mask(spec: Tensor | list[int] | Any, n: int) -> Tensor:
    """A bool mask (n,) from a mask or a list of indices of the corrupted training labels."""
    spec = torch.as_tensor(spec)
    if spec.dtype == torch.bool:
        if spec.numel() != n:
            raise ValueError(f"`noisy_labels` mask has length {spec.numel()}, the training set {n}.")
        return spec.flatten()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[spec.long()] = True
    return mask


def noisy_label_metrics(self_influence: Tensor, grouping: Grouping, noisy: Tensor) -> dict[str, float]:
    """Noisy-label AUC (each example scored by its row) and the fraction of noisy labels among the rows inspected,
    highest ``self_influence`` (num_rows,) first, until 10% of the examples are seen. Empty when ``noisy`` (n,) flags
    no example or every example."""
    if not 0 < int(noisy.sum()) < noisy.numel():
        return {}
    s = self_influence.detach().cpu()
    return {"noisy_label_auc": float(noisy_label_auc(s[grouping.assignment], noisy)),
            "noisy_recall_at_10pct": recall_at(noisy_label_recall(s, grouping.assignment, noisy), 0.1)}


def topk_rows(top: TopK, queries: tuple[Tensor, Tensor, Tensor]) -> list[dict[str, Any]]:
    """One dict per (query, rank): query index and label, proponent / opponent row and score."""
    _, qy, qi = queries
    rows = []
    for j in range(len(qi)):
        for r in range(top.proponents.values.shape[1]):
            rows.append(dict(query=int(qi[j]), query_label=int(qy[j]), rank=r + 1,
                             proponent=int(top.proponents.indices[j, r]),
                             proponent_score=float(top.proponents.values[j, r]),
                             opponent=int(top.opponents.indices[j, r]), opponent_score=float(top.opponents.values[j, r])))
    return rows
