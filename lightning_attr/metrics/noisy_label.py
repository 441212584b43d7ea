"""Noisy-label detection: how well a per-example score (e.g. self-influence) ranks corrupted labels first."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["noisy_label_auc", "NoisyLabelAUC"]


def noisy_label_auc(scores: Tensor, is_noisy: Tensor) -> Tensor:
    """ROC AUC of ``scores`` (n,) for flagging ``is_noisy`` (n,) bool: the Mann-Whitney statistic with average ranks
    for ties, i.e. P(score of a noisy example > score of a clean one) + 0.5 P(tie)."""
    scores, is_noisy = scores.detach().double().flatten(), is_noisy.bool().flatten()
    if scores.shape != is_noisy.shape:
        raise ValueError(f"`scores` and `is_noisy` need the same length, got {scores.numel()} and {is_noisy.numel()}.")
    n_pos = int(is_noisy.sum())
    n_neg = is_noisy.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"noisy-label AUC needs noisy and clean examples, got {n_pos} noisy and {n_neg} clean.")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each distinct value
    ranks = avg_rank[inverse]
    return (ranks[is_noisy].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


class NoisyLabelAUC(Metric):
    """``update(scores (B,), is_noisy (B,))``; ``compute()`` is :func:`noisy_label_auc` over everything seen
    (gathered across ranks)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("noisy", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_noisy: Tensor) -> None:
        self.scores.append(scores.detach().flatten().double())
        self.noisy.append(is_noisy.flatten().bool())

    def compute(self) -> Tensor:
        return noisy_label_auc(dim_zero_cat(self.scores), dim_zero_cat(self.noisy))
