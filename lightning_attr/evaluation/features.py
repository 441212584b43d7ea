"""Feature-attribution evaluation: error of per-example estimators and amortized explainers against exact values,
and the per-example budget at which an estimator matches an amortized explainer's error (equal-error compute)."""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from lightning_attr.estimators import get_estimator
from lightning_attr.estimators.base import Game
from lightning_attr.metrics.functional import attribution_mse, attribution_pearson, attribution_spearman, sign_agreement

__all__ = ["attribution_errors", "per_example_curve", "amortized_row", "equal_error_budget", "break_even",
           "inference_seconds", "evaluations_per_example", "oracle_rate"]


def attribution_errors(preds: Tensor, exact: Tensor) -> dict[str, float]:
    """MSE, Pearson, Spearman and sign agreement of ``preds`` (N, d, K) against ``exact`` (N, d, K)."""
    return {
        "mse": float(attribution_mse(preds, exact)),
        "pearson": float(attribution_pearson(preds, exact)),
        "spearman": float(attribution_spearman(preds, exact)),
        "sign_agreement": float(sign_agreement(preds, exact)),
    }


def per_example_curve(
    game: Game,
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
        preds = torch.cat([est(game, x[i : i + batch_size], budget, generator=gen)
                           for i in range(0, len(x), batch_size)])
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


def break_even(fixed: float, per_example_method: float, per_example_amortized: float) -> float:
    """Number of explained examples from which amortization (a ``fixed`` cost, then ``per_example_amortized`` per
    example) costs less in total than a per-example method at ``per_example_method`` per example (any one unit, e.g.
    game evaluations); ``inf`` when it never does."""
    gain = per_example_method - per_example_amortized
    return fixed / gain if gain > 0 else math.inf


@torch.no_grad()
def inference_seconds(explainer: Callable[[Tensor], Tensor], x: Tensor, images: int = 2048, batch_size: int = 256,
                      repeats: int = 3) -> float:
    """Seconds per explained image of ``explainer`` (``explainer(x) -> (B, d, K)``) over ``images`` copies of ``x``
    (N, C, H, W) in batches of ``batch_size``, as when explaining a data set; best of ``repeats`` after a warm-up."""
    many = x.repeat(-(-images // len(x)), 1, 1, 1)[:images]
    explainer(many[:batch_size])
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in many.split(batch_size):
            explainer(batch)
        best = min(best, time.perf_counter() - start)
    return best / images


def evaluations_per_example(game: Game, x: Tensor, estimator: str, budget: int) -> int:
    """Game evaluations ``estimator`` really spends per example at ``budget`` (estimators round budgets to whole
    units), counted by the game on the first example of ``x``."""
    before = game.num_evaluations
    get_estimator(estimator)(game, x[:1], budget, generator=torch.Generator().manual_seed(0))
    return game.num_evaluations - before


def oracle_rate(game: Game, x: Tensor, budget: int = 512, repeats: int = 3) -> float:
    """Game evaluations per second of ``permutation_shapley`` at ``budget`` on ``x`` (N, C, H, W), counted by the
    game: the best of ``repeats`` calls after a warm-up call."""
    est = get_estimator("permutation_shapley")
    est(game, x, budget, generator=torch.Generator().manual_seed(0))
    best = 0.0
    for _ in range(repeats):
        before, start = game.num_evaluations, time.perf_counter()
        est(game, x, budget, generator=torch.Generator().manual_seed(0))
        best = max(best, (game.num_evaluations - before) / (time.perf_counter() - start))
    return best
