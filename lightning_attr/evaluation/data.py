"""Data-attribution evaluation: the linear datamodeling score (LDS), noisy-label recall and group pruning curves.
Pure functions over attribution scores and a user's ``train_fn``; nothing here trains a model itself."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from lightning_attr.metrics.functional import average_ranks, pearson_rows

__all__ = ["random_subsets", "lds", "noisy_label_recall", "recall_at", "prune_groups", "pruning_curve"]


def random_subsets(n: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """(num_subsets, n) bool masks, each with exactly ``round(fraction * n)`` members drawn uniformly (seeded)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction}.")
    if num_subsets < 2:
        raise ValueError(f"`num_subsets` must be >= 2 for a rank correlation, got {num_subsets}.")
    g = torch.Generator().manual_seed(seed)
    size = max(1, round(fraction * n))
    masks = torch.zeros(num_subsets, n, dtype=torch.bool)
    for s in range(num_subsets):
        masks[s, torch.randperm(n, generator=g)[:size]] = True
    return masks


def lds(
    train_fn: Callable[[Tensor], Tensor],
    scores: Tensor,
    num_subsets: int = 32,
    fraction: float = 0.5,
    seed: int = 0,
    masks: Tensor | None = None,
) -> dict[str, Tensor | float]:
    """Linear datamodeling score of attribution ``scores`` (n_train, n_target).

    For random subsets ``S`` (``fraction`` of the training set; or the given ``masks`` (num_subsets, n_train)),
    ``train_fn(indices of S) -> (n_target,)`` retrains on ``S`` and returns the model outputs on the targets. The
    prediction of the attribution is ``sum_{i in S} scores[i]``. LDS is the Spearman correlation over subsets between
    predicted and actual outputs, per target, averaged over targets.

    Returns ``{"lds": float, "per_target": (n_target,), "masks", "predicted", "actual": (num_subsets, n_target)}``.
    """
    n = scores.shape[0]
    masks = random_subsets(n, num_subsets, fraction, seed) if masks is None else masks.bool()
    if masks.dim() != 2 or masks.shape[1] != n:
        raise ValueError(f"`masks` must be (num_subsets, {n}), got {tuple(masks.shape)}.")
    actual = torch.stack([torch.as_tensor(train_fn(m.nonzero().flatten())).detach().double().flatten().cpu()
                          for m in masks])
    predicted = masks.double() @ scores.double().cpu()
    if actual.shape != predicted.shape:
        raise ValueError(f"`train_fn` must return one output per target ({scores.shape[1]}), got {actual.shape[1]}.")
    per_target = pearson_rows(average_ranks(predicted.T), average_ranks(actual.T))
    return {"lds": float(per_target.mean()), "per_target": per_target, "masks": masks, "predicted": predicted,
            "actual": actual}


def _rank_groups(scores: Tensor, order: str) -> Tensor:
    if order not in ("highest", "lowest"):
        raise ValueError(f"`order` must be 'highest' or 'lowest', got {order!r}.")
    return torch.argsort(scores.double(), descending=order == "highest", stable=True)


def noisy_label_recall(group_scores: Tensor, assignment: Tensor, is_noisy: Tensor) -> dict[str, Tensor]:
    """Inspect groups from the highest score down: after each group, the fraction of training examples inspected
    and the fraction of noisy labels found. Returns ``{"inspected", "recall"}``, each (n_groups + 1,) from 0.

    With single examples as groups (``assignment = arange(n)``) this is the usual per-example recall curve.
    """
    assignment, is_noisy = torch.as_tensor(assignment).long(), torch.as_tensor(is_noisy).bool()
    if assignment.shape != is_noisy.shape:
        raise ValueError(f"`assignment` and `is_noisy` need one entry per example, got {assignment.numel()} and "
                         f"{is_noisy.numel()}.")
    if int(is_noisy.sum()) == 0:
        raise ValueError("`is_noisy` flags no example; recall is undefined.")
    g = group_scores.numel()
    sizes = torch.bincount(assignment, minlength=g).double()
    found = torch.bincount(assignment, weights=is_noisy.double(), minlength=g)
    order = _rank_groups(group_scores, "highest")
    zero = torch.zeros(1, dtype=torch.float64)
    return {"inspected": torch.cat([zero, sizes[order].cumsum(0) / assignment.numel()]),
            "recall": torch.cat([zero, found[order].cumsum(0) / is_noisy.sum()])}


def recall_at(curve: dict[str, Tensor], fraction: float) -> float:
    """Recall after inspecting ``fraction`` of the examples (linear between whole groups)."""
    import numpy as np

    return float(np.interp(fraction, curve["inspected"].numpy(), curve["recall"].numpy()))


def prune_groups(group_scores: Tensor, assignment: Tensor, fraction: float, order: str = "highest",
                 seed: int | None = None) -> Tensor:
    """Indices (sorted) of the training examples kept after removing whole groups until ``fraction`` of the
    examples is gone: groups with the ``order`` (``"highest"`` / ``"lowest"``) scores first, or, with ``seed``,
    in a seeded random order (the baseline). The group that crosses the target is removed too."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`fraction` must be in [0, 1), got {fraction}.")
    assignment = torch.as_tensor(assignment).long()
    g = group_scores.numel()
    if seed is None:
        ranked = _rank_groups(group_scores, order)
    else:
        ranked = torch.randperm(g, generator=torch.Generator().manual_seed(seed))
    sizes = torch.bincount(assignment, minlength=g)
    removed_before = sizes[ranked].cumsum(0) - sizes[ranked]
    drop = ranked[removed_before < round(fraction * assignment.numel())]
    return (~torch.isin(assignment, drop)).nonzero().flatten()


def pruning_curve(train_fn: Callable[[Tensor], float], group_scores: Tensor, assignment: Tensor,
                  fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3), order: str = "highest", random_seeds: int = 2
                  ) -> dict[str, list[float]]:
    """Accuracy (``train_fn(kept indices) -> float``) after pruning the ``order``-scored groups, against random
    group removal (mean over ``random_seeds`` orders), at each removed ``fraction``."""
    scored, random_ = [], []
    for f in fractions:
        scored.append(float(train_fn(prune_groups(group_scores, assignment, f, order))))
        random_.append(sum(float(train_fn(prune_groups(group_scores, assignment, f, seed=s)))
                           for s in range(random_seeds)) / random_seeds)
    return {"fraction": list(fractions), "scored": scored, "random": random_}
