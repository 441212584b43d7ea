"""TRAK (Park et al., 2023) as an attribution method, and its functional form over stored checkpoints.

Per checkpoint ``c``: ``X_c`` (n, k) = projected per-example gradients of the margin ``logit_y - logsumexp_{j != y}
logit_j`` (train and query share the projection of ``c``), ``X_c^T X_c`` accumulated in fp32, the kernel features
``K_c = X_c (X_c^T X_c + lambda I)^-1`` with ``lambda = damping * mean(diag(X_c^T X_c))``, and ``Q_c = 1 - p_y``.
Scores are ``mean_c(K_c Phi_c^T) * mean_c(Q_c)``; self-influence ``mean_c(x_c^T (X_c^T X_c + lambda I)^-1 x_c) *
mean_c(Q_c)``. For groups the rows are the features of the group's summed margin, ``Q`` the mean of the members', and
``X^T X`` is built from rows weighted by ``1 / size`` (an estimate of the per-example ``X^T X``): not additive.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from typing_extensions import override

from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.grads import segment_sum
from lightning_attr.influence.method import AttributionMethod, accumulate, register_method
from lightning_attr.influence.scores import Features, damped_inverse, out_to_loss, trak_kernel, xtx

__all__ = ["TRAKMethod", "trak_scores", "trak_self_influence"]


@register_method
class TRAKMethod(AttributionMethod):
    """TRAK with relative ``damping`` (default 1e-3) of ``X^T X``."""

    name = "trak"
    output = "margin"
    mean_keys = ("q",)

    def __init__(self, damping: float = 1e-3) -> None:
        if damping < 0:
            raise ValueError(f"`damping` must be >= 0, got {damping}.")
        self.damping = damping

    @override
    def config(self) -> dict[str, Any]:
        return {"damping": self.damping}

    @override
    def featurize(self, featurizer: GradientFeaturizer, x: Tensor, y: Tensor, key: tuple[int, ...],
                  bounds: Tensor | None = None, state: dict[str, Any] | None = None) -> dict[str, Tensor]:
        feats = featurizer(x, y, key, bounds)
        with torch.no_grad():
            q = segment_sum(out_to_loss(featurizer.module(x), y), bounds)
        return {"x": feats, "q": q}

    @override
    def finish(self, rows: dict[str, Tensor], sizes: Tensor | None) -> dict[str, Tensor]:
        x = rows["x"]
        weighted = x if sizes is None else x / sizes.to(x).sqrt().unsqueeze(1)
        return {"x": x, "kernel": trak_kernel(x, damped_inverse(xtx(weighted), self.damping)), "q": rows["q"].float()}

    @override
    def train_side(self, stored: dict[str, Tensor]) -> Features:
        return stored["kernel"]

    @override
    def summary_terms(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"leverage": (stored["kernel"].float() * stored["x"].float()).sum(1), "q": stored["q"].float()}

    @override
    def combine(self, total: Tensor, summary: dict[str, Tensor], num_checkpoints: int, rows: slice = slice(None)
                ) -> Tensor:
        c = max(num_checkpoints, 1)
        return total / c * (summary["q"][rows] / c).unsqueeze(1).to(total.device)

    @override
    def self_influence(self, summary: dict[str, Tensor], num_checkpoints: int) -> Tensor:
        c = max(num_checkpoints, 1)
        return summary["leverage"] / c * summary["q"] / c


def trak_scores(kernels: Sequence[Tensor], queries: Sequence[Tensor], q: Sequence[Tensor]) -> Tensor:
    """TRAK scores (n_train, n_query) = ``mean_c(K_c Phi_c^T) * mean_c(Q_c)[:, None]``."""
    if not (len(kernels) == len(queries) == len(q)) or not kernels:
        raise ValueError(f"need one kernel, query and Q per checkpoint: {len(kernels)}, {len(queries)}, {len(q)}.")
    method = TRAKMethod()
    total = sum(method.block({"kernel": k}, phi) for k, phi in zip(kernels, queries))
    return method.combine(total, {"q": sum(qc.float() for qc in q)}, len(kernels))


def trak_self_influence(kernels: Sequence[Tensor], xs: Sequence[Tensor], q: Sequence[Tensor]) -> Tensor:
    """TRAK self-influence (n,): ``mean_c(x_c^T (X_c^T X_c + lambda I)^-1 x_c) * mean_c(Q_c)``."""
    method, summary = TRAKMethod(), {}
    for k, x, qc in zip(kernels, xs, q):
        accumulate(summary, method.summary_terms({"kernel": k, "x": x, "q": qc}))
    return method.self_influence(summary, len(kernels))
