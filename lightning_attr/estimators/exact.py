"""Exact Shapley, Banzhaf and LIME values by enumerating all ``2^d`` coalitions (the ground truth, d <= 20)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_attr.estimators.base import Game, check_inputs, register

__all__ = ["MAX_EXACT_PLAYERS", "EXACT_FOR_TARGET", "coalitions", "exact_shapley", "exact_banzhaf", "exact_lime",
           "exact_values"]

MAX_EXACT_PLAYERS = 20


def coalitions(start: int, stop: int, d: int, device: torch.device | str = "cpu") -> Tensor:
    """Coalitions ``start..stop-1`` in binary order as boolean masks (stop - start, d); bit ``i`` is player ``i``."""
    ints = torch.arange(start, stop, device=device, dtype=torch.int64)
    return (ints.unsqueeze(-1) >> torch.arange(d, device=device)) & 1 == 1


def shapley_weights(d: int) -> Tensor:
    """``w(s) = s! (d - s - 1)! / d!`` for ``s = 0..d-1`` in float64 (weight of the marginal ``v(S+i) - v(S)``, |S|=s)."""
    s = torch.arange(d, dtype=torch.float64)
    return torch.exp(torch.lgamma(s + 1) + torch.lgamma(d - s) - math.lgamma(d + 1))


def lime_kernel(sizes: Tensor, d: int, kernel_width: float) -> Tensor:
    """LIME's image kernel ``exp(-D^2 / width^2)`` with cosine distance ``D = 1 - sqrt(|S| / d)`` to the full image."""
    dist = 1.0 - torch.sqrt(sizes.double() / d)
    return torch.exp(-(dist**2) / kernel_width**2)


def _check_exact(game: Game, x: Tensor) -> int:
    d = check_inputs(game, x, None)
    if d > MAX_EXACT_PLAYERS:
        raise ValueError(
            f"Exact enumeration needs 2^d game evaluations; `game.num_players`={d} is too large "
            f"(allowed: d <= {MAX_EXACT_PLAYERS}). Use a sampling estimator instead."
        )
    return d


def _enumerate(game: Game, x: Tensor, d: int, block: int):
    """Yield ``(masks (m, d), values (B, m, K) float64)`` over all coalitions in blocks of ``block``."""
    b = x.shape[0]
    for start in range(0, 2**d, block):
        masks = coalitions(start, min(start + block, 2**d), d, x.device)
        values = game(x, masks.unsqueeze(0).expand(b, -1, -1))
        yield masks, values.double()


def exact_values(
    game: Game,
    x: Tensor,
    kinds: tuple[str, ...] = ("shapley", "banzhaf"),
    block: int = 8192,
    kernel_width: float = 0.5,
) -> dict[str, Tensor]:
    """Several exact attributions from one enumeration: ``{kind: (B, d, K)}`` for kinds in shapley/banzhaf/lime."""
    unknown = set(kinds) - {"shapley", "banzhaf", "lime"}
    if unknown:
        raise ValueError(f"`kinds` may contain 'shapley', 'banzhaf', 'lime'; got unknown {sorted(unknown)}.")
    d = _check_exact(game, x)
    w = shapley_weights(d).to(x.device)
    sums: dict[str, Tensor] = {}
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=x.device)
    for masks, v in _enumerate(game, x, d, block):
        z = masks.double()
        size = masks.sum(-1)
        if "shapley" in kinds:
            # v(S) enters phi_i with +w(|S|-1) if i in S and -w(|S|) otherwise (the clamps only touch zero terms).
            plus = w[(size - 1).clamp(min=0)].unsqueeze(-1) * z
            minus = w[size.clamp(max=d - 1)].unsqueeze(-1) * (1 - z)
            coef = plus - minus
            sums["shapley"] = sums.get("shapley", 0) + torch.einsum("md,bmk->bdk", coef, v)
        if "banzhaf" in kinds:
            sums["banzhaf"] = sums.get("banzhaf", 0) + torch.einsum("md,bmk->bdk", 2 * z - 1, v) / 2 ** (d - 1)
        if "lime" in kinds:
            zi = torch.cat([torch.ones_like(z[:, :1]), z], -1)
            kw = lime_kernel(size, d, kernel_width).unsqueeze(-1)
            gram += (zi * kw).T @ zi
            sums["lime"] = sums.get("lime", 0) + torch.einsum("md,bmk->bdk", zi * kw, v)
    out = {k: sums[k].float() for k in kinds if k != "lime"}
    if "lime" in kinds:
        out["lime"] = (torch.linalg.solve(gram, sums["lime"]))[:, 1:].float()
    return {k: out[k] for k in kinds}


@register("exact_shapley", target="shapley", unbiased=True)
def exact_shapley(game: Game, x: Tensor, num_samples: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Exact Shapley values (B, d, K) by enumeration of all ``2^d`` coalitions; ``num_samples`` is ignored."""
    return exact_values(game, x, ("shapley",))["shapley"]


@register("exact_banzhaf", target="banzhaf", unbiased=True)
def exact_banzhaf(game: Game, x: Tensor, num_samples: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Exact Banzhaf values (B, d, K) by enumeration of all ``2^d`` coalitions; ``num_samples`` is ignored."""
    return exact_values(game, x, ("banzhaf",))["banzhaf"]


@register("exact_lime", target="lime", unbiased=True)
def exact_lime(game: Game, x: Tensor, num_samples: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The infinite-sample limit of :func:`lime` (B, d, K): its weighted least squares over all ``2^d`` coalitions."""
    return exact_values(game, x, ("lime",))["lime"]


EXACT_FOR_TARGET = {"shapley": exact_shapley, "banzhaf": exact_banzhaf, "lime": exact_lime}
"""The exact estimator of each ``target`` ("shapley", "banzhaf", "lime"): the ground truth of a sampling estimator."""
