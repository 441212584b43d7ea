"""Data Shapley by permutation sampling (TMC-Shapley without truncation by default)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.estimators.sampling import uniform
from lightning_attr.valuation.estimators.base import Utility, check_points, register

__all__ = ["permutation_shapley"]


@register("permutation_shapley", target="shapley", unbiased=True, shares_samples=True,
          cost="N + 1 utility evaluations per permutation, shared by all points")
def permutation_shapley(utility: Utility, points: Tensor, num_samples: int, generator: torch.Generator | None = None,
                        truncation: float | None = None) -> Tensor:
    """Data Shapley values (P,): the mean over ``num_samples`` uniform permutations of all ``N`` points of each
    point's marginal contribution ``v(prefix + {i}) - v(prefix)`` (unbiased).

    Cost: ``num_samples * (N + 1)`` utility evaluations (every prefix), whatever ``P``. ``truncation``: TMC-Shapley's
    rule, contributions after the first prefix within ``truncation`` of ``v(all)`` are set to 0 (biased; saves no
    evaluation here because prefixes are fitted in one batch, kept for comparison with opendataval / pyDVL).
    """
    n = check_points(utility, points, num_samples)
    order = uniform((num_samples, n), generator, points.device).argsort(1)  # (M, N)
    prefixes = order.unsqueeze(1).expand(num_samples, n + 1, n)
    keep = torch.arange(n, device=points.device) < torch.arange(n + 1, device=points.device).unsqueeze(1)
    values = utility(torch.where(keep, prefixes, torch.full_like(prefixes, -1)).reshape(-1, n)).view(num_samples, -1)
    gain = values[:, 1:] - values[:, :-1]  # (M, N): contribution of the point at each position
    if truncation is not None:
        full = values[:, -1:]
        near = ((full - values[:, 1:]).abs() <= truncation).cumsum(1) > 1
        gain = torch.where(near, torch.zeros_like(gain), gain)
    by_point = torch.empty_like(gain).scatter_(1, order, gain)
    return by_point.mean(0)[points]
