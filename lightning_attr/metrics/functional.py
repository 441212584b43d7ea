"""Functional attribution-quality metrics.

Every metric compares predicted attributions ``preds`` with ground-truth attributions
``target``, both of shape ``(B, d, K)`` (``B`` examples, ``d`` players/features, ``K``
classes/outputs). A 2-D ``(B, d)`` input is treated as ``K = 1``.

Each metric is split into ``_<name>_update`` (returns additive sufficient statistics for
one batch) and ``_<name>_compute`` (turns accumulated statistics into the value). The public
functions compose the two, and the :mod:`lightning_attr.metrics.attribution` Metric classes
accumulate the same statistics across batches / DDP ranks with ``dist_reduce_fx="sum"``, so
a metric accumulated over any split of the data equals the functional value on all of it.

Sums are accumulated in ``float64`` and counts in ``int64``. Two row-wise building blocks are public for other
rank-correlation scores (e.g. the LDS in :mod:`lightning_attr.evaluation`): :func:`pearson_rows`, :func:`average_ranks`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "attribution_mse",
    "attribution_explained_variance",
    "attribution_pearson",
    "attribution_spearman",
    "sign_agreement",
    "efficiency_gap",
    "pearson_rows",
    "average_ranks",
]

_ACC = torch.float64  # accumulation dtype for sums


# ----------------------------------------------------------------------------- helpers
def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _as_3d(x: Tensor, name: str) -> Tensor:
    """``(B, d)`` -> ``(B, d, 1)``; ``(B, d, K)`` unchanged; anything else raises."""
    if x.ndim == 2:
        return x.unsqueeze(-1)
    if x.ndim != 3:
        raise ValueError(f"`{name}` must have shape (B, d, K) or (B, d), got {_shape(x)}")
    return x


def _compute_dtype(x: Tensor) -> torch.dtype:
    """At least float32 for per-example computations (keeps float64 inputs as is)."""
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def _check_pair(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Validate that ``preds`` and ``target`` share one ``(B, d, K)`` / ``(B, d)`` shape."""
    if preds.shape != target.shape:
        raise ValueError(
            f"`preds` and `target` must have the same shape, got preds {_shape(preds)} "
            f"and target {_shape(target)}"
        )
    preds, target = _as_3d(preds, "preds"), _as_3d(target, "target")
    dtype = torch.promote_types(_compute_dtype(preds), _compute_dtype(target))
    return preds.to(dtype), target.to(dtype)


def _nan_like(x: Tensor) -> Tensor:
    return torch.full((), float("nan"), dtype=_ACC, device=x.device)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` as a float64 scalar, NaN where ``den == 0``."""
    if not bool(den > 0):
        return _nan_like(num)
    return num.to(_ACC) / den.to(_ACC)


# ----------------------------------------------------------------------------- MSE
def _attribution_mse_update(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``(sum of squared errors [float64], number of entries [int64])``."""
    preds, target = _check_pair(preds, target)
    sse = (preds - target).square().sum(dtype=_ACC)
    n = torch.tensor(preds.numel(), dtype=torch.long, device=preds.device)
    return sse, n


def _attribution_mse_compute(sse: Tensor, n: Tensor) -> Tensor:
    return _safe_div(sse, n)


def attribution_mse(preds: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all ``B * d * K`` entries.

    ``mean_{b,i,k} (preds[b,i,k] - target[b,i,k])**2``; examples with more entries do not
    get more weight than the entry count implies (every entry weighs the same).

    Args:
        preds: ``(B, d, K)`` predicted attributions.
        target: ``(B, d, K)`` ground-truth attributions.

    Returns:
        Scalar float64 tensor (NaN for empty input).
    """
    return _attribution_mse_compute(*_attribution_mse_update(preds, target))


# ----------------------------------------------------------------------------- explained variance
def _attribution_explained_variance_update(
    preds: Tensor, target: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(sse, sum_y, sum_y2, n)`` with ``y = target`` (sums float64, ``n`` int64)."""
    preds, target = _check_pair(preds, target)
    y = target.to(_ACC)
    sse = (preds.to(_ACC) - y).square().sum()
    n = torch.tensor(target.numel(), dtype=torch.long, device=target.device)
    return sse, y.sum(), y.square().sum(), n


def _attribution_explained_variance_compute(sse: Tensor, sum_y: Tensor, sum_y2: Tensor, n: Tensor) -> Tensor:
    if not bool(n > 0):
        return _nan_like(sse)
    n = n.to(_ACC)
    sst = (sum_y2 - sum_y.square() / n).clamp_min(0.0)
    if not bool(sst > 0):  # constant target: sklearn's force_finite convention
        return torch.where(sse == 0, torch.ones_like(sse), torch.zeros_like(sse)).to(_ACC)
    return 1.0 - sse / sst


def attribution_explained_variance(preds: Tensor, target: Tensor) -> Tensor:
    """Pooled coefficient of determination ``1 - SSE / SST``.

    ``SSE = sum_{b,i,k} (preds - target)**2`` and ``SST = sum_{b,i,k} (target - ybar)**2``
    with ``ybar`` the *global* mean of ``target`` over all ``B * d * K`` entries (equals
    ``sklearn.metrics.r2_score(target.ravel(), preds.ravel())``; note: this is not
    sklearn's ``explained_variance_score``, which also subtracts the mean residual).
    If ``SST == 0`` the value is 1 when ``SSE == 0`` else 0.

    Args:
        preds: ``(B, d, K)`` predicted attributions.
        target: ``(B, d, K)`` ground-truth attributions.

    Returns:
        Scalar float64 tensor (NaN for empty input).
    """
    return _attribution_explained_variance_compute(*_attribution_explained_variance_update(preds, target))


# ----------------------------------------------------------------------------- correlations
def pearson_rows(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of each row pair of ``x, y`` ``(B, n)`` -> ``(B,)``.

    Rows where either side is constant (``max == min``) get correlation 0.
    """
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    cov = (xc * yc).sum(dim=1)
    den = (xc.square().sum(dim=1) * yc.square().sum(dim=1)).sqrt()
    valid = (x.amax(dim=1) > x.amin(dim=1)) & (y.amax(dim=1) > y.amin(dim=1)) & (den > 0)
    corr = cov / torch.where(valid, den, torch.ones_like(den))
    return torch.where(valid, corr.clamp(-1.0, 1.0), torch.zeros_like(corr))


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along dim 1 of ``x`` ``(B, n)`` -> ``(B, n)``; ties get their average rank."""
    b, n = x.shape
    if n == 0:
        return x.clone()
    sorted_x, order = x.sort(dim=1)
    pos = torch.arange(n, device=x.device).expand(b, n)
    first = torch.ones_like(sorted_x, dtype=torch.bool)
    first[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    # start / end position of each element's tie group (groups are contiguous once sorted)
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end = torch.where(last, pos, torch.full_like(pos, n)).flip(1).cummin(dim=1).values.flip(1)
    avg = (start + end).to(x.dtype) / 2 + 1
    return torch.empty_like(avg).scatter_(1, order, avg)


def _attribution_pearson_update(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``(sum over examples of per-example correlation [float64], B [int64])``."""
    preds, target = _check_pair(preds, target)
    corr = pearson_rows(preds.flatten(1), target.flatten(1))
    return corr.sum(dtype=_ACC), torch.tensor(corr.numel(), dtype=torch.long, device=corr.device)


def _attribution_spearman_update(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``(sum over examples of per-example rank correlation [float64], B [int64])``."""
    preds, target = _check_pair(preds, target)
    corr = pearson_rows(average_ranks(preds.flatten(1)), average_ranks(target.flatten(1)))
    return corr.sum(dtype=_ACC), torch.tensor(corr.numel(), dtype=torch.long, device=corr.device)


def _mean_corr_compute(corr_sum: Tensor, count: Tensor) -> Tensor:
    return _safe_div(corr_sum, count)


def attribution_pearson(preds: Tensor, target: Tensor) -> Tensor:
    """Per-example Pearson correlation, averaged over examples.

    For each example ``b`` the correlation is taken over its ``d * K`` entries
    (``preds[b].flatten()`` vs ``target[b].flatten()``); the result is the unweighted mean
    over the ``B`` examples. An example whose ``preds[b]`` or ``target[b]`` is constant
    contributes correlation 0.

    Args:
        preds: ``(B, d, K)`` predicted attributions.
        target: ``(B, d, K)`` ground-truth attributions.

    Returns:
        Scalar float64 tensor (NaN for ``B == 0``).
    """
    return _mean_corr_compute(*_attribution_pearson_update(preds, target))


def attribution_spearman(preds: Tensor, target: Tensor) -> Tensor:
    """Per-example Spearman rank correlation, averaged over examples.

    Like :func:`attribution_pearson` but on the per-example ranks of the ``d * K`` entries
    (tied values get their average rank, as ``scipy.stats.spearmanr``). An example whose
    ``preds[b]`` or ``target[b]`` is constant contributes 0.

    Args:
        preds: ``(B, d, K)`` predicted attributions.
        target: ``(B, d, K)`` ground-truth attributions.

    Returns:
        Scalar float64 tensor (NaN for ``B == 0``).
    """
    return _mean_corr_compute(*_attribution_spearman_update(preds, target))


# ----------------------------------------------------------------------------- sign agreement
def _sign_agreement_update(preds: Tensor, target: Tensor, atol: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Returns ``(number of agreeing entries, number of counted entries)`` (both int64)."""
    preds, target = _check_pair(preds, target)
    mask = target.abs() > atol
    agree = (torch.sign(preds) == torch.sign(target)) & mask
    return agree.sum(dtype=torch.long), mask.sum(dtype=torch.long)


def _sign_agreement_compute(agree: Tensor, total: Tensor) -> Tensor:
    return _safe_div(agree, total)


def sign_agreement(preds: Tensor, target: Tensor, atol: float = 1e-8) -> Tensor:
    """Fraction of entries with ``sign(preds) == sign(target)``, among entries with ``|target| > atol``.

    Entries where ``|target| <= atol`` are ignored; a prediction of exactly 0 on a counted
    entry is a disagreement. Pooled over all ``B * d * K`` entries.

    Args:
        preds: ``(B, d, K)`` predicted attributions.
        target: ``(B, d, K)`` ground-truth attributions.
        atol: entries with ``|target| <= atol`` are skipped.

    Returns:
        Scalar float64 tensor (NaN when no entry is counted).
    """
    return _sign_agreement_compute(*_sign_agreement_update(preds, target, atol))


# ----------------------------------------------------------------------------- efficiency
def _check_efficiency(preds: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    if preds.ndim not in (2, 3) or total.ndim != preds.ndim - 1:
        raise ValueError(
            f"`preds` must be (B, d, K) with `total` (B, K) (or (B, d) with (B,)), got preds "
            f"{_shape(preds)} and total {_shape(total)}"
        )
    if preds.ndim == 2:
        preds, total = preds.unsqueeze(-1), total.unsqueeze(-1)
    if total.shape[0] != preds.shape[0] or total.shape[1] != preds.shape[2]:
        raise ValueError(
            f"`total` must have shape (B, K) matching `preds` (B, d, K), got preds {_shape(preds)} "
            f"and total {_shape(total)}"
        )
    return preds, total


def _efficiency_gap_update(preds: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``(sum over (b, k) of |sum_i preds[b,i,k] - total[b,k]|, B * K)``."""
    preds, total = _check_efficiency(preds, total)
    gap = (preds.to(_ACC).sum(dim=1) - total.to(_ACC)).abs()
    return gap.sum(), torch.tensor(gap.numel(), dtype=torch.long, device=gap.device)


def _efficiency_gap_compute(gap_sum: Tensor, count: Tensor) -> Tensor:
    return _safe_div(gap_sum, count)


def efficiency_gap(preds: Tensor, total: Tensor) -> Tensor:
    """Mean absolute violation of the efficiency constraint.

    ``mean_{b,k} | sum_i preds[b,i,k] - total[b,k] |`` with ``total = v(all) - v(empty)``.

    Args:
        preds: ``(B, d, K)`` predicted attributions.
        total: ``(B, K)`` grand-coalition minus empty-coalition value per example and class.

    Returns:
        Scalar float64 tensor (NaN for empty input).
    """
    return _efficiency_gap_compute(*_efficiency_gap_update(preds, total))
