"""``torchmetrics`` wrappers around :mod:`lightning_attr.metrics.functional`.

All states are additive sufficient statistics (float64 sums, int64 counts) reduced with
``dist_reduce_fx="sum"``, so the synced value under DDP -- including uneven per-rank
splits -- equals the single-process value on the concatenated data. No metric keeps
per-example ("cat") state.

Note: float64 states (and float64 results) are not supported on Apple MPS.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from lightning_attr.metrics import functional as F

__all__ = [
    "AttributionMSE",
    "AttributionExplainedVariance",
    "AttributionPearson",
    "AttributionSpearman",
    "SignAgreement",
    "EfficiencyGap",
    "attribution_metrics",
]


def _zero_f() -> Tensor:
    return torch.zeros((), dtype=torch.float64)


def _zero_i() -> Tensor:
    return torch.zeros((), dtype=torch.long)


class AttributionMSE(Metric):
    """Mean squared error over all ``B * d * K`` entries (see :func:`F.attribution_mse`).

    ``update(preds, target)`` with ``preds, target`` of shape ``(B, d, K)`` (or ``(B, d)``).
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("mse_sse", default=_zero_f(), dist_reduce_fx="sum")
        self.add_state("mse_n", default=_zero_i(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        sse, n = F._attribution_mse_update(preds, target)
        self.mse_sse += sse.to(self.mse_sse.dtype)
        self.mse_n += n

    def compute(self) -> Tensor:
        return F._attribution_mse_compute(self.mse_sse, self.mse_n)


class AttributionExplainedVariance(Metric):
    """Pooled ``1 - SSE / SST`` with SST about the global target mean (see
    :func:`F.attribution_explained_variance`).

    ``update(preds, target)`` with ``preds, target`` of shape ``(B, d, K)`` (or ``(B, d)``).
    """

    is_differentiable = True
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("ev_sse", default=_zero_f(), dist_reduce_fx="sum")
        self.add_state("ev_sum_y", default=_zero_f(), dist_reduce_fx="sum")
        self.add_state("ev_sum_y2", default=_zero_f(), dist_reduce_fx="sum")
        self.add_state("ev_n", default=_zero_i(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        sse, sum_y, sum_y2, n = F._attribution_explained_variance_update(preds, target)
        dt = self.ev_sse.dtype
        self.ev_sse += sse.to(dt)
        self.ev_sum_y += sum_y.to(dt)
        self.ev_sum_y2 += sum_y2.to(dt)
        self.ev_n += n

    def compute(self) -> Tensor:
        return F._attribution_explained_variance_compute(
            self.ev_sse.double(), self.ev_sum_y.double(), self.ev_sum_y2.double(), self.ev_n
        )


class AttributionPearson(Metric):
    """Per-example Pearson correlation over the ``d * K`` entries, averaged over examples
    (see :func:`F.attribution_pearson`).

    ``update(preds, target)`` with ``preds, target`` of shape ``(B, d, K)`` (or ``(B, d)``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # state names differ from AttributionSpearman so MetricCollection never merges them
        self.add_state("pearson_sum", default=_zero_f(), dist_reduce_fx="sum")
        self.add_state("pearson_count", default=_zero_i(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        s, c = F._attribution_pearson_update(preds, target)
        self.pearson_sum += s.to(self.pearson_sum.dtype)
        self.pearson_count += c

    def compute(self) -> Tensor:
        return F._mean_corr_compute(self.pearson_sum, self.pearson_count)


class AttributionSpearman(Metric):
    """Per-example Spearman rank correlation (average ranks for ties) over the ``d * K``
    entries, averaged over examples (see :func:`F.attribution_spearman`).

    ``update(preds, target)`` with ``preds, target`` of shape ``(B, d, K)`` (or ``(B, d)``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("spearman_sum", default=_zero_f(), dist_reduce_fx="sum")
        self.add_state("spearman_count", default=_zero_i(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        s, c = F._attribution_spearman_update(preds, target)
        self.spearman_sum += s.to(self.spearman_sum.dtype)
        self.spearman_count += c

    def compute(self) -> Tensor:
        return F._mean_corr_compute(self.spearman_sum, self.spearman_count)


class SignAgreement(Metric):
    """Fraction of entries with ``sign(preds) == sign(target)`` among entries with
    ``|target| > atol`` (see :func:`F.sign_agreement`).

    ``update(preds, target)`` with ``preds, target`` of shape ``(B, d, K)`` (or ``(B, d)``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, atol: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if atol < 0:
            raise ValueError(f"`atol` must be non-negative, got {atol}")
        self.atol = float(atol)
        self.add_state("sign_agree", default=_zero_i(), dist_reduce_fx="sum")
        self.add_state("sign_total", default=_zero_i(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        a, t = F._sign_agreement_update(preds, target, self.atol)
        self.sign_agree += a
        self.sign_total += t

    def compute(self) -> Tensor:
        return F._sign_agreement_compute(self.sign_agree, self.sign_total)


class EfficiencyGap(Metric):
    """Mean over examples and classes of ``|sum_i preds[b,i,k] - total[b,k]|`` (see
    :func:`F.efficiency_gap`).

    ``update(preds, total)`` with ``preds`` ``(B, d, K)`` and ``total = v(all) - v(empty)``
    of shape ``(B, K)`` (or ``(B, d)`` with ``(B,)``).
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("eff_gap_sum", default=_zero_f(), dist_reduce_fx="sum")
        self.add_state("eff_count", default=_zero_i(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, total: Tensor) -> None:
        s, c = F._efficiency_gap_update(preds, total)
        self.eff_gap_sum += s.to(self.eff_gap_sum.dtype)
        self.eff_count += c

    def compute(self) -> Tensor:
        return F._efficiency_gap_compute(self.eff_gap_sum, self.eff_count)


def attribution_metrics(prefix: str = "", sign_atol: float = 1e-8) -> MetricCollection:
    """All ``(preds, target)`` attribution metrics (everything but :class:`EfficiencyGap`).

    Keys (after ``prefix``): ``mse``, ``explained_variance``, ``pearson``, ``spearman``,
    ``sign_agreement``. Compute groups are disabled so metrics never share state.

    Args:
        prefix: prepended to every key, e.g. ``"val/"``.
        sign_atol: ``atol`` of :class:`SignAgreement`.
    """
    return MetricCollection(
        {
            "mse": AttributionMSE(),
            "explained_variance": AttributionExplainedVariance(),
            "pearson": AttributionPearson(),
            "spearman": AttributionSpearman(),
            "sign_agreement": SignAgreement(atol=sign_atol),
        },
        prefix=prefix,
        compute_groups=False,
    )
