"""Attribution-quality and data-attribution metrics (functional core + DDP-safe ``torchmetrics`` classes).

All metrics compare ``preds`` with ``target`` of shape ``(B, d, K)``; :class:`EfficiencyGap`
compares ``preds`` ``(B, d, K)`` with ``total = v(all) - v(empty)`` of shape ``(B, K)``.
"""

from lightning_attr.metrics import functional
from lightning_attr.metrics.attribution import (
    AttributionExplainedVariance,
    AttributionMSE,
    AttributionPearson,
    AttributionSpearman,
    EfficiencyGap,
    SignAgreement,
    attribution_metrics,
)
from lightning_attr.metrics.noisy_label import NoisyLabelAUC, noisy_label_auc
from lightning_attr.metrics.functional import (
    attribution_explained_variance,
    attribution_mse,
    attribution_pearson,
    attribution_spearman,
    efficiency_gap,
    sign_agreement,
)

__all__ = [
    "AttributionMSE",
    "AttributionExplainedVariance",
    "AttributionPearson",
    "AttributionSpearman",
    "SignAgreement",
    "EfficiencyGap",
    "attribution_metrics",
    "attribution_mse",
    "attribution_explained_variance",
    "attribution_pearson",
    "attribution_spearman",
    "sign_agreement",
    "efficiency_gap",
    "functional",
    "NoisyLabelAUC",
    "noisy_label_auc",
]
