"""Distributional Data Shapley: the mean marginal contribution over coalitions of uniformly random size drawn from
the data."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.estimators.sampling import uniform
from lightning_attr.valuation.estimators.base import Utility, check_cardinality, check_points, register
from lightning_attr.valuation.estimators.sampling import subsets_without, with_point

__all__ = ["distributional_shapley", "DEFAULT_CARDINALITY"]

DEFAULT_CARDINALITY = (0, 100)


def _paired_gains(utility: Utility, without: Tensor, points: Tensor) -> Tensor:
    """``v(S + {i}) - v(S)`` (R,) for coalitions ``without`` (R, k) and ``points`` (R,); a utility with ``fit`` /
    ``score`` (as :class:`~lightning_attr.valuation.LogisticUtility`) warm-starts each larger fit from the smaller."""
    if not (hasattr(utility, "fit") and hasattr(utility, "score")):
        both = utility(torch.cat([with_point(without, points), with_point(without, torch.full_like(points, -1))]))
        return both[: len(points)] - both[len(points):]
    gains = []
    for block in range(0, len(points), 4096):  # bounds the fitted weights held at once
        rows = slice(block, block + 4096)
        small = utility.fit(without[rows])
        large = utility.fit(with_point(without[rows], points[rows]), init=small)
        gains.append((utility.score(large) - utility.score(small)).double())
    return torch.cat(gains)


@register("distributional_shapley", target="distributional_shapley", unbiased=True, shares_samples=False,
          cost="2 utility evaluations per point")
def distributional_shapley(utility: Utility, points: Tensor, num_samples: int,
                           generator: torch.Generator | None = None,
                           cardinality: tuple[int, int] = DEFAULT_CARDINALITY) -> Tensor:
    """Values (P,) ``E_k E_S [v(S + {i}) - v(S)]``, ``k ~ Uniform{low..high}``, ``S`` a uniform ``k``-subset of the
    other points: the mean of ``num_samples`` marginal contributions per point (unbiased).

    Cost: ``2 * P * num_samples`` utility evaluations, on coalitions of at most ``high + 1`` points (cheap fits).
    With ``cardinality=(0, N - 1)`` the target is Data Shapley itself.
    """
    n = check_points(utility, points, num_samples)
    low, high = check_cardinality(cardinality, n)
    rows = points.repeat_interleave(num_samples)
    sizes = low + (uniform((len(rows),), generator, points.device) * (high - low + 1)).long().clamp(max=high - low)
    without = subsets_without(rows, sizes, n, generator)
    gain = _paired_gains(utility, without, rows)
    return gain.view(len(points), num_samples).mean(1)
