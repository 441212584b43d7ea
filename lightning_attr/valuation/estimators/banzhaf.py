"""Data Banzhaf by maximum sample reuse (every sample updates every point), unbiased."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.estimators.sampling import uniform
from lightning_attr.valuation.estimators.base import Utility, check_points, register

__all__ = ["data_banzhaf"]


@register("data_banzhaf", target="banzhaf", unbiased=True, shares_samples=True,
          cost="1 utility evaluation per sample, shared by all points")
def data_banzhaf(utility: Utility, points: Tensor, num_samples: int,
                 generator: torch.Generator | None = None) -> Tensor:
    """Data Banzhaf values (P,) as ``phi_i = 2 E[v(S) (2 z_i - 1)]``, ``z ~ Bernoulli(1/2)^N``.

    Samples come in complementary pairs ``(S, N \\ S)`` (each still uniform, so the estimate stays unbiased; constant
    offsets of ``v`` cancel, which is what makes reuse across points low-variance). Cost: ``num_samples`` rounded down
    to an even number (at least 2) utility evaluations, whatever ``P``.
    """
    n = check_points(utility, points, num_samples, minimum=2)
    pairs = max(1, num_samples // 2)
    z = uniform((pairs, n), generator, points.device) < 0.5
    z = torch.stack([z, ~z], 1).reshape(2 * pairs, n)
    v = utility(z).double()
    sign = 2 * z.double() - 1
    return (2 * sign.T @ v / len(z))[points]
