"""Distributional influence from coupled seeds (d-TDA, arXiv 2506.12965).

Training seed ``s`` (initialization, batch order) gives ``X_s = m(theta_s)`` (S,) or (S, Q) for Q measurements.
Removing example ``k`` from the run of seed ``s`` (same seed: coupled) changes it by ``G_{s,k}`` (S, K) or (S, K, Q),
predicted (``grad m^T r_T`` of :mod:`lightning_attr.distributional.unrolled`) or measured by retraining; the
coupled sample without ``k`` is ``Y_{s,k} = X_s + G_{s,k}``. Each statistic compares the empirical distribution of
``Y_{., k}`` over seeds with that of ``X`` (sign: statistic of Y minus statistic of X, i.e. after minus before the
removal) and returns (K,) or (K, Q), vectorised over examples and measurements:

- ``mean_influence``: ``mean_s Y - mean_s X = mean_s G``;
- ``variance_influence``: ``var_s Y - var_s X`` (unbiased, divisor ``S - 1``, unless ``unbiased=False``: ``S``);
- ``wasserstein_influence``: the 1-D Wasserstein-2 distance of the two empirical distributions,
  ``sqrt(mean_j (X_(j) - Y_(j))^2)`` over the sorted samples (>= 0, no sign);
- ``quantile_influence(q)``: ``quantile(Y, q) - quantile(X, q)`` (``torch.quantile``, linear interpolation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["mean_influence", "quantile_influence", "variance_influence", "wasserstein_influence"]


def coupled(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Validate ``x`` (S,) / (S, Q) and ``g`` (S, K) / (S, K, Q); return ``x`` as (S, 1[, Q]) and ``Y = x + g``."""
    if x.dim() not in (1, 2):
        raise ValueError(f"`x` must be (S,) or (S, Q) measurements per seed, got shape {tuple(x.shape)}.")
    if x.shape[0] < 2:
        raise ValueError(f"`x` has S={x.shape[0]} seed(s); distributional statistics need S >= 2 coupled seeds.")
    expected = (x.shape[0], "K", *x.shape[1:])
    if g.dim() != x.dim() + 1 or g.shape[0] != x.shape[0] or g.shape[2:] != x.shape[1:]:
        raise ValueError(f"`g` must be {expected} (seeds, examples, measurements as in `x` {tuple(x.shape)}), got "
                         f"{tuple(g.shape)}.")
    dtype = torch.result_type(x, g)
    dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    x = x.to(dtype).unsqueeze(1)
    return x, x + g.to(dtype)


def mean_influence(x: Tensor, g: Tensor) -> Tensor:
    """Change of the mean over seeds: ``mean_s G`` (K,) or (K, Q)."""
    x, y = coupled(x, g)
    return (y - x).mean(0)


def variance_influence(x: Tensor, g: Tensor, unbiased: bool = True) -> Tensor:
    """Change of the variance over seeds: ``var_s Y - var_s X`` (K,) or (K, Q); divisor ``S - 1`` if ``unbiased``
    else ``S``."""
    x, y = coupled(x, g)
    correction = 1 if unbiased else 0
    return y.var(0, correction=correction) - x.var(0, correction=correction)


def wasserstein_influence(x: Tensor, g: Tensor) -> Tensor:
    """1-D Wasserstein-2 distance between the empirical distributions of X and Y over seeds:
    ``sqrt(mean((sort X - sort Y)^2))`` (K,) or (K, Q)."""
    x, y = coupled(x, g)
    return (x.sort(0).values - y.sort(0).values).pow(2).mean(0).sqrt()


def quantile_influence(x: Tensor, g: Tensor, q: float | Sequence[float] | Tensor) -> Tensor:
    """Shift of the ``q``-quantile over seeds: ``quantile(Y, q) - quantile(X, q)`` (linear interpolation, as
    ``torch.quantile``): (K,) or (K, Q) for a scalar ``q``, with a leading (len(q),) for several."""
    x, y = coupled(x, g)
    qs = torch.as_tensor(q, dtype=y.dtype, device=y.device)
    if qs.dim() > 1 or qs.numel() == 0 or not bool(((qs >= 0) & (qs <= 1)).all()):
        raise ValueError(f"`q` must be a probability in [0, 1] or a 1-D sequence of them, got {q}.")
    return torch.quantile(y, qs, dim=0) - torch.quantile(x, qs, dim=0)
