"""The data-valuation estimator contract, its registry and input checks.

``estimator(utility, points, num_samples, generator=None, **options) -> Tensor (P,)`` float64: noisy estimates of
the values of ``points`` (P,) (indices into the utility's training set), reaching the data only through
``utility(subsets)`` and ``utility.num_points``. ``num_samples`` is the budget in samples per point (what one sample
costs in utility evaluations is ``estimator.cost``). Each estimator carries ``.name``, ``.target``, ``.unbiased`` and
``.shares_samples`` (one sample updates every point, so its cost does not grow with ``P``).
"""

from __future__ import annotations

import numbers
from typing import Callable, Protocol

import torch
from torch import Tensor

__all__ = ["Utility", "ValuationEstimator", "VALUATION_ESTIMATORS", "register", "get_valuation_estimator",
           "check_points", "check_cardinality"]


class Utility(Protocol):
    """``utility(subsets) -> (B,)`` for boolean masks (B, N) or ``-1``-padded index lists (B, k); ``num_points`` N."""

    num_points: int

    def __call__(self, subsets: Tensor) -> Tensor: ...


class ValuationEstimator(Protocol):
    name: str
    target: str
    unbiased: bool
    shares_samples: bool
    cost: str

    def __call__(self, utility: Utility, points: Tensor, num_samples: int,
                 generator: torch.Generator | None = None, **options) -> Tensor: ...


VALUATION_ESTIMATORS: dict[str, ValuationEstimator] = {}


def register(name: str, target: str, unbiased: bool, shares_samples: bool, cost: str) -> Callable:
    """Register a function as the estimator ``name`` of ``target``; ``cost`` says what one sample costs."""

    def wrap(fn: Callable) -> ValuationEstimator:
        fn.name, fn.target, fn.unbiased = name, target, unbiased  # type: ignore[attr-defined]
        fn.shares_samples, fn.cost = shares_samples, cost  # type: ignore[attr-defined]
        VALUATION_ESTIMATORS[name] = fn  # type: ignore[assignment]
        return fn  # type: ignore[return-value]

    return wrap


def get_valuation_estimator(name: str) -> ValuationEstimator:
    """The registered estimator ``name``; a ``ValueError`` lists the allowed names."""
    if name not in VALUATION_ESTIMATORS:
        raise ValueError(f"Unknown valuation `estimator`={name!r}; allowed: {sorted(VALUATION_ESTIMATORS)}.")
    return VALUATION_ESTIMATORS[name]


def check_points(utility: Utility, points: Tensor, num_samples: int | None, minimum: int = 1) -> int:
    """Validate ``points`` (P,) and ``num_samples``; return ``N``."""
    n = int(utility.num_points)
    if not isinstance(points, Tensor) or points.dim() != 1 or points.dtype != torch.long:
        raise ValueError(f"`points` must be a 1-D int64 tensor of indices, got {points!r:.80}.")
    if len(points) and (int(points.min()) < 0 or int(points.max()) >= n):
        raise ValueError(f"`points` must lie in 0..{n - 1}, got min {int(points.min())}, max {int(points.max())}.")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral)
                                    or num_samples < minimum):
        raise ValueError(f"`num_samples` must be an integer >= {minimum} (samples per point), got {num_samples!r}.")
    return n


def check_cardinality(cardinality: tuple[int, int], num_points: int) -> tuple[int, int]:
    """``(low, high)`` with ``0 <= low <= high <= N - 1`` (sizes of the coalition a point joins)."""
    low, high = (int(c) for c in cardinality)
    if not 0 <= low <= high <= num_points - 1:
        raise ValueError(f"`cardinality`={tuple(cardinality)} must satisfy 0 <= low <= high <= N - 1 = "
                         f"{num_points - 1} (the coalition a point joins holds other points of the data set).")
    return low, high
