"""LIME for patch games: weighted least squares with intercept on Bernoulli(1/2) coalitions (biased)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.estimators.base import Game, check_inputs, register
from lightning_attr.estimators.exact import lime_kernel
from lightning_attr.estimators.sampling import solve, uniform

__all__ = ["lime"]


@register("lime", target="lime", unbiased=False)
def lime(
    game: Game,
    x: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    *,
    kernel_width: float = 0.5,
    ridge: float = 1e-3,
) -> Tensor:
    """LIME coefficients (B, d, K) with kernel ``exp(-(1 - sqrt(|S|/d))^2 / kernel_width^2)``.

    ``num_samples`` coalitions per example. ``ridge`` is added to the *summed* normal equations, so its effect
    vanishes as the budget grows and the estimate converges to :func:`~lightning_attr.estimators.exact_lime`.
    """
    d = check_inputs(game, x, num_samples, minimum=2)
    if kernel_width <= 0:
        raise ValueError(f"`kernel_width` must be > 0, got {kernel_width}.")
    b = x.shape[0]
    z = uniform((b, num_samples, d), generator, x.device) < 0.5
    v = game(x, z).double()
    zi = torch.cat([torch.ones_like(z[..., :1]), z], -1).double()
    w = lime_kernel(z.sum(-1), d, kernel_width).unsqueeze(-1)
    gram = (zi * w).transpose(1, 2) @ zi
    gram = gram + ridge * torch.diag(torch.tensor([0.0] + [1.0] * d, dtype=torch.float64, device=x.device))
    rhs = (zi * w).transpose(1, 2) @ v
    return solve(gram, rhs)[:, 1:].float()
