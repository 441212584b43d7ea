"""Attribution-quality and data-attribution metrics (functional core + DDP-safe ``torchmetrics`` classes).

All metrics compare ``preds`` with ``target`` of shape ``(B, d, K)``; :class:`EfficiencyGap`
compares ``preds`` ``(B, d, K)`` with ``total = v(all) - v(empty)`` of shape ``(B, K)``.
The functional forms (``attribution_mse``, ...) live in :mod:`lightning_attr.metrics.functional` and are importable
from here too.
"""

from lightning_attr.metrics import functional  # noqa: F401
from lightning_attr.metrics.attribution import (
    AttributionExplainedVariance,
    AttributionMSE,
    AttributionPearson,
    AttributionSpearman,
    EfficiencyGap,
    SignAgreement,
    attribution_metrics,
)
from lightning_attr.metrics.functional import (  # noqa: F401  (importable here, advertised in .functional)
    attribution_explained_variance,
    attribution_mse,
    attribution_pearson,
    attribution_spearman,
    efficiency_gap,
    sign_agreement,
)
from lightning_attr.metrics.noisy_label import NoisyLabelAUC, noisy_label_auc

__all__ = [
    "AttributionMSE",
    "AttributionExplainedVariance",
    "AttributionPearson",
    "AttributionSpearman",
    "SignAgreement",
    "EfficiencyGap",
    "attribution_metrics",
    "NoisyLabelAUC",
    "noisy_label_auc",
]
