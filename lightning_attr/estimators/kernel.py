"""KernelSHAP (constrained weighted least squares, consistent) and unbiased KernelSHAP (Covert & Lee, 2021)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_attr.estimators.base import Game, check_inputs, endpoints, register
from lightning_attr.estimators.sampling import random_subsets_of_size, solve, uniform

__all__ = ["kernel_shap", "unbiased_kernel_shap", "shapley_kernel_sizes", "shapley_kernel_gram"]


@functools.lru_cache(maxsize=64)
def shapley_kernel_sizes(d: int) -> Tensor:
    """Distribution of coalition sizes ``s = 1..d-1`` under the Shapley kernel: ``p(s) ∝ 1 / (s (d - s))``."""
    s = torch.arange(1, d, dtype=torch.float64)
    p = 1.0 / (s * (d - s))
    return p / p.sum()


@functools.lru_cache(maxsize=64)
def shapley_kernel_gram(d: int) -> Tensor:
    """``A = E[z z^T]`` (d, d) in float64 for ``z`` drawn from the Shapley kernel (closed form).

    ``A_ii = 1/2`` and ``A_ij = sum_s p(s) s (s - 1) / (d (d - 1))`` for ``i != j``.
    """
    p = shapley_kernel_sizes(d)
    s = torch.arange(1, d, dtype=torch.float64)
    off = (p * s * (s - 1)).sum() / (d * (d - 1))
    gram = torch.full((d, d), float(off), dtype=torch.float64)
    gram.fill_diagonal_(0.5)
    return gram


def _paired_kernel_samples(b: int, pairs: int, d: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``2 * pairs`` coalitions per example from the Shapley kernel, each followed by its complement: (B, 2 pairs, d)."""
    cdf = shapley_kernel_sizes(d).cumsum(0).to(device)
    u = uniform((b, pairs), generator, device).double()
    sizes = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=d - 2) + 1
    z = random_subsets_of_size(sizes, d, generator)
    return torch.stack([z, ~z], 2).reshape(b, 2 * pairs, d)


def _check_kernel(game: Game, x: Tensor, num_samples: int) -> tuple[int, int]:
    d = check_inputs(game, x, num_samples, minimum=4)
    if d < 2:
        raise ValueError(f"KernelSHAP needs `game.num_players` >= 2, got {d}.")
    return d, max(1, (num_samples - 2) // 2)


def _constrained(gram: Tensor, b: Tensor, total: Tensor) -> Tensor:
    """argmin ``phi^T A phi - 2 b^T phi`` s.t. ``1^T phi = total``: gram (B|1, d, d), b (B, d, K), total (B, K)."""
    a_inv_b = solve(gram, b)
    a_inv_1 = solve(gram, torch.ones_like(b[..., :1]))
    shift = (a_inv_b.sum(1, keepdim=True) - total.double().unsqueeze(1)) / a_inv_1.sum(1, keepdim=True)
    return (a_inv_b - a_inv_1 * shift).float()


@register("kernel_shap", target="shapley", unbiased=False)
def kernel_shap(game: Game, x: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """KernelSHAP (B, d, K): least squares on coalitions drawn from the Shapley kernel, with the efficiency constraint.

    Uses paired sampling (each coalition with its complement). Budget: ``2 + 2 * pairs`` evaluations. Consistent
    but biased at any finite budget (the sampled ``A`` is inverted).
    """
    d, pairs = _check_kernel(game, x, num_samples)
    v0, v1 = endpoints(game, x, d)
    z = _paired_kernel_samples(x.shape[0], pairs, d, generator, x.device)
    v = game(x, z) - v0.unsqueeze(1)
    zf = z.double()
    gram = zf.transpose(1, 2) @ zf / z.shape[1]
    b = zf.transpose(1, 2) @ v.double() / z.shape[1]
    return _constrained(gram, b, v1 - v0)


@register("unbiased_kernel_shap", target="shapley", unbiased=True)
def unbiased_kernel_shap(game: Game, x: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """Unbiased KernelSHAP (B, d, K): only ``b = E[z (v(z) - v(0))]`` is sampled, ``A`` is exact.

    The solution is linear in the sampled ``b``, hence unbiased; efficiency holds exactly for every draw. Paired
    sampling; budget ``2 + 2 * pairs`` evaluations.
    """
    d, pairs = _check_kernel(game, x, num_samples)
    v0, v1 = endpoints(game, x, d)
    z = _paired_kernel_samples(x.shape[0], pairs, d, generator, x.device)
    v = game(x, z) - v0.unsqueeze(1)
    b = z.double().transpose(1, 2) @ v.double() / z.shape[1]
    gram = shapley_kernel_gram(d).to(x.device).unsqueeze(0)
    return _constrained(gram, b, v1 - v0)
