"""Influence functions (Koh & Liang, 2017) as an attribution method.

``score(z, q) = grad f(q)^T (H + lambda I)^-1 grad l(z)`` with ``l`` the training loss of ``z``, ``f`` the loss of the
query ``q``, and ``H`` the curvature (Gauss-Newton / Fisher, or Hessian) of the MEAN training loss at the checkpoint's
weights (see :mod:`lightning_attr.influence.curvature`). Sign and scale: removing ``z`` from ``N`` training examples
moves the weights by about ``+(H + lambda I)^-1 grad l(z) / N``, so the query's loss changes by ``+score / N``. A
positive score makes ``z`` a proponent (its removal would raise the query's loss), as for TracIn and TRAK; the 1/N is
left out of the scores. Self-influence is ``grad l(z)^T (H + lambda I)^-1 grad l(z)``.

Rows are linear in the training gradient, so a group's score (the gradient of its summed loss) is the sum of its
members' scores, exactly. Per checkpoint the engine stores the projected gradients ``P grad l(z)`` (``P`` = the
featurizer's projection of that checkpoint, identity with ``proj_dim=None``); queries are preconditioned, then
projected by the same ``P``: ``<P g_z, P H^-1 g_q>`` is unbiased for ``g_z^T H^-1 g_q`` and exact without projection.
Self-influence is ``g_z^T (H + lambda I)^-1 g_z``, exact per example; for a group, ``<P g_G, P H^-1 g_G>`` from two
linear rows (so a group split over batches adds up; exact without projection).
Several checkpoints are averaged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_attr.influence.curvature import CURVATURES, DataTotal, make_curvature
from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.method import AttributionMethod, register_method
from lightning_attr.influence.scores import Features

__all__ = ["InfluenceFunctionMethod", "influence_scores"]


@register_method
class InfluenceFunctionMethod(AttributionMethod):
    """Influence functions with a curvature ``strategy`` (``"exact"``, ``"cg"``, ``"lissa"``, ``"kfac"``,
    ``"ekfac"``); ``damping`` (relative to the mean eigenvalue unless ``relative_damping=False``), ``curvature``
    (``"ggn"`` or ``"hessian"``), ``fisher`` (``"true"``: every label weighted by the model's probability,
    ``"sampled"``: one label drawn from the model, or ``"empirical"``: the data's), ``seed`` (sampled labels), ``fit_samples`` (training examples the curvature is fitted on; None: all), ``self_influence`` (precondition
    every training row for it; False: queries only, as Kronfluence's pairwise scores); ``options``:
    ``cg_iterations``, ``cg_tol``, ``lissa_depth``, ``power_iterations``."""

    name = "influence_function"
    output = "cross_entropy"

    def __init__(self, strategy: str = "ekfac", damping: float = 1e-3, relative_damping: bool = True,
                 curvature: str = "ggn", fisher: str = "true", seed: int = 0, fit_samples: int | None = None,
                 self_influence: bool = True, **options: Any) -> None:
        if strategy not in CURVATURES:
            raise ValueError(f"`strategy`={strategy!r} is not one of {sorted(CURVATURES)}.")
        if fit_samples is not None and fit_samples < 1:
            raise ValueError(f"`fit_samples` must be None (all) or >= 1, got {fit_samples}.")
        self.fit_samples = fit_samples
        self.settings = dict(strategy=strategy, damping=damping, relative_damping=relative_damping,
                             curvature=curvature, fisher=fisher, seed=seed, fit_samples=fit_samples,
                             self_influence=self_influence, **options)
        self.curvature = make_curvature(strategy, damping=damping, relative_damping=relative_damping,
                                        curvature=curvature, fisher=fisher, seed=seed, **options)

    @property
    def has_self_influence(self) -> bool:
        return self.curvature.per_row and self.settings["self_influence"]

    @override
    def config(self) -> dict[str, Any]:
        return dict(self.settings)

    @override
    def fit_state(self, featurizer: GradientFeaturizer, total: DataTotal) -> dict[str, Tensor]:
        return self.curvature.fit(featurizer, total)

    @override
    def featurize(self, featurizer: GradientFeaturizer, x: Tensor, y: Tensor, key: tuple[int, ...],
                  bounds: Tensor | None = None, state: dict[str, Any] | None = None) -> dict[str, Tensor]:
        flat = featurizer.flat_grads(x, y, bounds)
        rows = {"features": featurizer.project(flat, key)}
        if self.has_self_influence:  # every training row preconditioned: float32 math
            if bounds is None:  # one example per row: exact here
                rows["self_influence"] = self.curvature.quadratic(featurizer, flat, state)
            else:  # a group may span batches: its two linear rows add up, the quadratic form comes in `finish`
                pre = self.curvature.solve(featurizer, flat, state, dtype=torch.float32)
                rows["preconditioned"] = featurizer.project(pre, key)
        return rows

    @override
    def query_features(self, featurizer: GradientFeaturizer, x: Tensor, y: Tensor, key: tuple[int, ...],
                       state: dict[str, Any] | None = None) -> Features:
        flat = featurizer.flat_grads(x, y)
        return featurizer.project(self.curvature.solve(featurizer, flat, state, state.get("total")), key)

    @override
    def finish(self, rows: dict[str, Tensor], sizes: Tensor | None) -> dict[str, Tensor]:
        out = {k: v for k, v in rows.items() if k != "preconditioned"}
        if "preconditioned" in rows:
            out["self_influence"] = (rows["features"].double() * rows["preconditioned"].double()).sum(1)
        return out

    @override
    def train_side(self, stored: dict[str, Tensor]) -> Features:
        return stored["features"]

    @override
    def block(self, stored: dict[str, Tensor], query: Features, rows: slice = slice(None)) -> Tensor:
        # preconditioned queries are large where the curvature is small: float64 keeps member sums and group rows equal
        return stored["features"][rows].double() @ query.double().T

    @override
    def summary_terms(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"self": stored["self_influence"]} if "self_influence" in stored else {}

    @override
    def combine(self, total: Tensor, summary: dict[str, Tensor], num_checkpoints: int, rows: slice = slice(None)
                ) -> Tensor:
        return total / max(num_checkpoints, 1)

    @override
    def self_influence(self, summary: dict[str, Tensor], num_checkpoints: int) -> Tensor:
        if "self" not in summary:
            raise ValueError(f"self-influence needs a solve per training example: not computed with strategy="
                             f"{self.settings['strategy']!r}, self_influence={self.settings['self_influence']} (cg / "
                             "lissa precondition queries only); use 'ekfac', 'kfac' or 'exact' with self_influence=True.")
        return summary["self"] / max(num_checkpoints, 1)


def influence_scores(train: list[Tensor], preconditioned_queries: list[Tensor]) -> Tensor:
    """Influence scores (n_train, n_query) from per-checkpoint train features and preconditioned query features,
    averaged over checkpoints (the functional form of the callback's ``scores``)."""
    method = InfluenceFunctionMethod(strategy="exact")
    total = sum(method.block({"features": t}, q) for t, q in zip(train, preconditioned_queries))
    return method.combine(total, {}, len(train))

