"""Antithetic permutation sampling of Shapley values (unbiased)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.estimators.base import Game, check_inputs, endpoints, register
from lightning_attr.estimators.sampling import uniform

__all__ = ["permutation_shapley"]


def num_permutation_pairs(num_samples: int, d: int) -> int:
    """Antithetic pairs that fit ``num_samples`` evaluations: ``2 + 2 * pairs * (d - 1)`` evaluations in all."""
    return max(1, round((num_samples - 2) / max(2 * (d - 1), 1)))


@register("permutation_shapley", target="shapley", unbiased=True)
def permutation_shapley(game: Game, x: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """Shapley values (B, d, K) as the mean marginal contribution over random permutations.

    Permutations come in antithetic pairs (a permutation and its reverse). ``v(empty)`` and ``v(all)`` are shared,
    so a pair costs ``2 (d - 1)`` evaluations; the number of pairs is ``num_samples`` rounded to the nearest pair
    (at least one). Every draw is unbiased and satisfies efficiency exactly.
    """
    d = check_inputs(game, x, num_samples)
    b = x.shape[0]
    pairs = num_permutation_pairs(num_samples, d)
    v0, v1 = endpoints(game, x, d)
    perms = uniform((b, pairs, d), generator, x.device).argsort(-1)
    perms = torch.cat([perms, perms.flip(-1)], 1)  # (B, P, d), P = 2 * pairs
    p = perms.shape[1]
    rank = perms.argsort(-1)  # rank[b, p, i] = position of player i
    if d > 1:
        # Coalition j (j = 1..d-1) holds the first j players of the permutation.
        steps = torch.arange(1, d, device=x.device).view(1, 1, d - 1, 1)
        masks = rank.unsqueeze(2) < steps  # (B, P, d-1, d)
        mid = game(x, masks.reshape(b, p * (d - 1), d)).view(b, p, d - 1, -1)
        values = torch.cat([v0[:, None, None].expand(b, p, 1, -1), mid, v1[:, None, None].expand(b, p, 1, -1)], 2)
    else:
        values = torch.stack([v0, v1], 1)[:, None].expand(b, p, 2, -1)
    marginal = values[:, :, 1:] - values[:, :, :-1]  # (B, P, d, K), indexed by position
    by_player = marginal.gather(2, rank.unsqueeze(-1).expand(-1, -1, -1, marginal.shape[-1]))
    return by_player.mean(1)
