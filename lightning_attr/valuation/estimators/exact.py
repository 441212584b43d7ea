"""Exact Data Shapley, distributional Data Shapley and Data Banzhaf values by enumerating all ``2^N`` subsets
(``N <= 12``): the ground truth of tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_attr.valuation.estimators.base import Utility, check_cardinality

__all__ = ["exact_data_values", "MAX_EXACT_POINTS"]

MAX_EXACT_POINTS = 12


def exact_data_values(utility: Utility, cardinality: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """``{"shapley", "banzhaf", "distributional_shapley"}`` -> values (N,) float64 of every point (the last only
    with ``cardinality``: ``mean_{k=low..high} mean_{|S|=k, i not in S} [v(S + {i}) - v(S)]``)."""
    n = int(utility.num_points)
    if n > MAX_EXACT_POINTS:
        raise ValueError(f"Exact values enumerate 2^N subsets: `utility.num_points` must be <= {MAX_EXACT_POINTS}, "
                         f"got {n}.")
    codes = torch.arange(2**n)
    masks = (codes.unsqueeze(1) >> torch.arange(n)) & 1 == 1  # (2^N, N)
    v = utility(masks).double().cpu()
    sizes = masks.sum(1)
    out = {"shapley": torch.zeros(n, dtype=torch.float64), "banzhaf": torch.zeros(n, dtype=torch.float64)}
    weight = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)],
                          dtype=torch.float64)
    if cardinality is not None:
        low, high = check_cardinality(cardinality, n)
        per_size = torch.tensor([1 / math.comb(n - 1, s) / (high - low + 1) if low <= s <= high else 0.0
                                 for s in range(n)], dtype=torch.float64)
        out["distributional_shapley"] = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        without = ~masks[:, i]
        gain = v[codes[without] | (1 << i)] - v[without]
        s = sizes[without]
        out["shapley"][i] = (weight[s] * gain).sum()
        out["banzhaf"][i] = gain.mean()
        if cardinality is not None:
            out["distributional_shapley"][i] = (per_size[s] * gain).sum()
    return out
