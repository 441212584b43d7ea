"""Influence functions as a Lightning callback: curvature fitted on the training data at fit end (or every N epochs)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_attr.callbacks.influence import InfluenceCallback
from lightning_attr.influence.attribution import Attribution, Normalize
from lightning_attr.influence.influence_function import InfluenceFunctionMethod
from lightning_attr.influence.method import AttributionMethod

__all__ = ["InfluenceFunction"]


class InfluenceFunction(InfluenceCallback):
    """Influence functions of your own training: ``score(z, q) = grad f(q)^T (H + lambda I)^-1 grad l(z)``, the
    change of the query's loss when ``z`` is removed, times N (see :mod:`lightning_attr.influence.influence_function`
    for the sign and the 1/N).

    At the end of fit (default; or every ``every_n_epochs`` epochs, averaged) the callback fits the curvature of the
    mean training loss at the current weights (a pass over the training data, or ``fit_samples`` of it, all-reduced
    under DDP), stores it with the checkpoint, and stores the (projected) per-example or per-group gradients, so
    ``scores`` after fit never refits.

    Takes every argument of :class:`TracIn` except ``in_step`` (defaults here: ``at_fit_end=True``,
    ``every_n_epochs=None``, ``projection="sketch"``) plus:

    Args:
        strategy: ``"ekfac"`` (default), ``"kfac"`` (Linear / Conv2d layers: select them with ``module_types`` when the
            model has other trainable layers), ``"exact"`` (tiny models), ``"cg"`` or ``"lissa"`` (matrix-free, any
            module; they precondition queries only, so no self-influence and no noisy-label metrics).
        damping: ``lambda``, relative to the mean eigenvalue (per layer for K-FAC) unless ``relative_damping=False``.
        curvature: ``"ggn"`` (Gauss-Newton = true Fisher of the softmax cross-entropy) or ``"hessian"`` (exact, cg, lissa).
        fisher: ``"true"`` (every label weighted by the model's probability: exact, one backward per class),
            ``"sampled"`` (one label per example drawn from the model, as Kronfluence: cheaper, noisy for confident
            models) or ``"empirical"`` (the data's labels).
        fit_samples: fit the curvature on a seeded random subset of this many training examples (None: all).
        self_influence: precondition every training row for its self-influence (and the noisy-label metrics); False
            stores gradients only and preconditions queries (cheaper, as Kronfluence's pairwise scores).
        cg_iterations / cg_tol / lissa_depth: iterative solvers' budget.

    ``InfluenceFunction.load(dirpath, model, train_data=...)`` answers from the stored files in any process
    (``train_data`` only for ``cg`` / ``lissa``).
    """

    method_class = InfluenceFunctionMethod

    def __init__(self, *args: Any, strategy: str = "ekfac", damping: float = 1e-3, relative_damping: bool = True,
                 curvature: str = "ggn", fisher: str = "true", fit_samples: int | None = None,
                 self_influence: bool = True, cg_iterations: int = 100,
                 cg_tol: float = 1e-6, lissa_depth: int = 1000, every_n_epochs: int | None = None,
                 at_fit_end: bool = True, projection: str = "sketch", **kwargs: Any) -> None:
        self.settings = dict(strategy=strategy, damping=damping, relative_damping=relative_damping,
                             curvature=curvature, fisher=fisher, fit_samples=fit_samples, seed=kwargs.get("seed", 0),
                             self_influence=self_influence,
                             cg_iterations=cg_iterations, cg_tol=cg_tol, lissa_depth=lissa_depth)
        super().__init__(*args, every_n_epochs=every_n_epochs, at_fit_end=at_fit_end, projection=projection, **kwargs)

    @override
    def make_method(self) -> AttributionMethod:
        return InfluenceFunctionMethod(**self.settings)

    @classmethod
    @override
    def load(cls, dirpath: str, module: torch.nn.Module, normalize: Normalize | None = None,
             train_data: Dataset | DataLoader | None = None) -> Attribution:
        return Attribution.load(dirpath, module, normalize, method=cls.method_class.name, train_data=train_data)
