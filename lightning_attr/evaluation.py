"""Evaluation helpers: error of per-example estimators and amortized explainers against exact values, the
equal-error compute ratio, and the linear datamodeling score of data attributions. Pure functions a benchmark,
the demo or a test calls."""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from lightning_attr.estimators import get_estimator
from lightning_attr.metrics.functional import (
    _average_ranks,
    _pearson_rows,
    attribution_mse,
    attribution_pearson,
    attribution_spearman,
    sign_agreement,
)

__all__ = ["attribution_errors", "per_example_curve", "amortized_row", "equal_error_budget", "lds", "random_subsets",
           "noisy_label_recall", "recall_at", "prune_groups", "pruning_curve"]


def attribution_errors(preds: Tensor, exact: Tensor) -> dict[str, float]:
    """MSE, Pearson, Spearman and sign agreement of ``preds`` (N, d, K) against ``exact`` (N, d, K)."""
    return {
        "mse": float(attribution_mse(preds, exact)),
        "pearson": float(attribution_pearson(preds, exact)),
        "spearman": float(attribution_spearman(preds, exact)),
        "sign_agreement": float(sign_agreement(preds, exact)),
    }


def per_example_curve(
    game,
    x: Tensor,
    exact: Tensor,
    estimators: Sequence[str],
    budgets: Sequence[int],
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> list[dict]:
    """Run each per-example estimator at each budget on ``x`` (N, C, H, W); one row per (estimator, budget).

    Each row: ``method``, ``budget`` (requested), ``evals_per_example`` (counted by the game when it counts),
    ``seconds`` and the :func:`attribution_errors` against ``exact`` (N, d, K).
    """
    from tqdm.auto import tqdm

    rows = []
    jobs = [(name, budget) for name in estimators for budget in budgets]
    for name, budget in tqdm(jobs, desc="per-example estimators", disable=not progress, leave=False):
        est = get_estimator(name)
        gen = torch.Generator().manual_seed(seed)
        before = getattr(game, "num_evaluations", 0)
        start = time.perf_counter()
        preds = torch.cat([est(game, x[i : i + batch_size], budget, generator=gen) for i in range(0, len(x), batch_size)])
        seconds = time.perf_counter() - start
        evals = (getattr(game, "num_evaluations", 0) - before) / len(x)
        rows.append({"method": name, "budget": budget, "evals_per_example": evals or float(budget), "seconds": seconds,
                     **attribution_errors(preds, exact)})
    return rows


@torch.no_grad()
def amortized_row(explainer: Callable[[Tensor], Tensor], x: Tensor, exact: Tensor, label_budget: float,
                  batch_size: int = 256) -> dict:
    """Error of an amortized explainer (``explainer(x) -> (B, d, K)``) on ``x`` against ``exact``.

    ``label_budget`` is the game evaluations per *training* example spent on its labels (reported, not used).
    """
    start = time.perf_counter()
    preds = torch.cat([explainer(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return {"method": "amortized", "budget": label_budget, "evals_per_example": 2.0,
            "seconds": time.perf_counter() - start, **attribution_errors(preds, exact)}


def equal_error_budget(rows: Sequence[dict], target_mse: float) -> float:
    """Per-example budget at which a method's MSE equals ``target_mse`` (log-log interpolation of its rows).

    Extrapolates from the last two points (MSE ~ 1/budget) when ``target_mse`` is below every row; returns
    ``nan`` with fewer than two rows.
    """
    pts = sorted((r["evals_per_example"], r["mse"]) for r in rows)
    if len(pts) < 2:
        return math.nan
    logs = [(math.log(b), math.log(max(m, 1e-30))) for b, m in pts]
    target = math.log(max(target_mse, 1e-30))
    for (b0, m0), (b1, m1) in zip(logs, logs[1:]):
        if m1 <= target <= m0 and m0 != m1:
            return math.exp(b0 + (target - m0) * (b1 - b0) / (m1 - m0))
    (b0, m0), (b1, m1) = (logs[0], logs[1]) if target > logs[0][1] else (logs[-2], logs[-1])
    slope = (m1 - m0) / (b1 - b0) if b1 != b0 else -1.0
    return math.exp(b1 + (target - m1) / (slope if slope < 0 else -1.0))


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
    per_target = _pearson_rows(_average_ranks(predicted.T), _average_ranks(actual.T))
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
