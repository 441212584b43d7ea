"""TRAK as a Lightning callback: projected margin gradients, a damped kernel per checkpoint, ensembled."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.callbacks.influence import InfluenceCallback
from lightning_attr.influence.grads import segment_sum
from lightning_attr.influence.scores import Features, damped_inverse, out_to_loss, trak_kernel, xtx

__all__ = ["TRAK"]


class TRAK(InfluenceCallback):
    """TRAK ensembled over the checkpoints the passes see (Park et al., 2023).

    Per pass ``c``: ``X_c`` = projected per-example gradients of the margin ``logit_y - logsumexp_{j != y}
    logit_j`` (the projection ``P^T grad / sqrt(k)`` is seeded by ``(seed, c)``, shared by train and query
    features), ``X_c^T X_c`` in fp32, ``K_c = X_c (X_c^T X_c + lambda I)^-1`` with ``lambda = damping *
    mean(diag(X_c^T X_c))``, and ``Q_c = 1 - p_y``. Scores are ``mean_c(K_c Phi_c^T) * mean_c(Q_c)``;
    self-influence is ``mean_c(x_c^T (X_c^T X_c + lambda I)^-1 x_c) * mean_c(Q_c)``.

    Takes every argument of :class:`TracIn` (``last_layer`` selects the classifier's parameters and projects its
    gradients like any others) plus ``damping`` (default 1e-3, relative). ``proj_dim=None`` keeps exact gradients
    (then ``X^T X`` is num_params x num_params: tiny models only). With ``group_by``, rows are groups: the features
    of a group are those of its summed margin, its ``Q`` the mean of its members', and ``X^T X`` is accumulated from
    group rows weighted by ``1 / size`` (an estimate of the per-example ``X^T X``); not additive: measure fidelity.
    """

    method = "trak"
    output = "margin"
    uses_lr = False
    mean_keys = ("q",)  # a group's Q is the mean of its members'

    def __init__(self, *args, damping: float = 1e-3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if damping < 0:
            raise ValueError(f"`damping` must be >= 0, got {damping}.")
        self.damping = damping

    def _featurize(self, x: Tensor, y: Tensor, key: tuple[int, ...], bounds: Tensor | None = None
                   ) -> dict[str, Tensor]:
        feats = self.featurizer(x, y, key, bounds)
        with torch.no_grad():
            q = segment_sum(out_to_loss(self.module(x), y), bounds)
        return {"x": feats, "q": q}

    def _finish(self, data: dict[str, Tensor]) -> dict[str, Tensor]:
        x = data["x"]
        # grouped: a group's feature is the sum of its members', so X_G^T X_G over-weights big groups and has rank
        # n_groups; weighting each row by 1 / size estimates the per-example X^T X instead (see benchmarks/ggda.py)
        rows = x if self.grouping is None else x / self.grouping.sizes.to(x).sqrt().unsqueeze(1)
        kernel = trak_kernel(x, damped_inverse(xtx(rows), self.damping))
        for name, value in (("leverage", (kernel * x.float()).sum(1)), ("q", data["q"].float())):
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        return {"x": x, "kernel": kernel, "q": data["q"]}

    def _train_side_of(self, stored: dict[str, Tensor]) -> Features:
        return stored["kernel"]

    def _combine(self, total: Tensor, start: int, stop: int) -> Tensor:
        c = len(self.records) or 1
        return total / c * (self.sums["q"][start:stop] / c).unsqueeze(1).to(total.device)

    def state_dict(self):
        return {**super().state_dict(), "damping": self.damping}

    def _rows_self_influence(self) -> Tensor:
        """TRAK self-influence per row (example or group)."""
        if "leverage" not in self.sums:
            raise RuntimeError("no attribution pass has run yet; fit with the callback first.")
        c = len(self.records) or 1
        return self.sums["leverage"] / c * self.sums["q"] / c
