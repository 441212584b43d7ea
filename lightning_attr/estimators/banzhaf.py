"""Banzhaf values by maximum sample reuse (unbiased)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.estimators.base import Game, check_inputs, register
from lightning_attr.estimators.sampling import uniform

__all__ = ["banzhaf"]


@register("banzhaf", target="banzhaf", unbiased=True)
def banzhaf(game: Game, x: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """Banzhaf values (B, d, K) as ``phi_i = 2 E[v(S) (2 z_i - 1)]`` with ``z ~ Bernoulli(1/2)^d``.

    Every sample updates every player. Samples are paired with their complements (each is still uniform, so the
    estimate stays unbiased, and constant offsets of ``v`` cancel). Budget: ``num_samples`` rounded down to an even
    number (at least 2).
    """
    d = check_inputs(game, x, num_samples, minimum=2)
    b = x.shape[0]
    pairs = max(1, num_samples // 2)
    z = uniform((b, pairs, d), generator, x.device) < 0.5
    z = torch.stack([z, ~z], 2).reshape(b, 2 * pairs, d)
    v = game(x, z).double()
    sign = 2 * z.double() - 1
    return (2 * sign.transpose(1, 2) @ v / z.shape[1]).float()
