"""Influence functions as a Lightning callback: curvature fitted on the training data at fit end (or every N epochs)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_attr.callbacks.context import bind_splits
from lightning_attr.callbacks.influence import InfluenceCallback
from lightning_attr.distributional.influence_function import (
    check_loss_measurement,
    influence_run_result,
    loss_queries,
)
from lightning_attr.distributional.measurements import QueryLosses, SplitLosses, measure_value
from lightning_attr.distributional.results import RunResult, result_seed, write_run_result
from lightning_attr.influence.attribution import Attribution, Normalize
from lightning_attr.influence.influence_function import InfluenceFunctionMethod
from lightning_attr.influence.isolation import isolated
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
        distributional: feed d-TDA (:class:`~lightning_attr.distributional.DistributionalInfluence`): cross-entropy
            query losses, ``QueryLosses(x, y)`` or ``SplitLosses(split="val", num=8)`` (bound to the datamodule's
            ``splits`` when fit starts); other measurements are refused, and so is ``group_by`` (rows must be single
            examples). At fit end, after the last pass, every rank computes ``change = scores(queries) / N`` (N, Q),
            the first-order change of each query's loss when each of the N training examples is removed, and
            ``value`` = the query losses at the final weights (eval mode); rank zero writes them to
            ``{directory}/distributional.safetensors`` (method ``"influence_function"``, ``examples`` 0..N-1; see
            :mod:`lightning_attr.distributional.results`). With several passes the scores are their average.
        run_seed: the seed written with the d-TDA result (default: the seed ``lightning.seed_everything`` set, from
            ``PL_GLOBAL_SEED``; an error when neither is known). Not ``seed``, which seeds the projection.

    ``InfluenceFunction.load(dirpath, model, train_data=...)`` answers from the stored files in any process
    (``train_data`` only for ``cg`` / ``lissa``).
    """

    method_class = InfluenceFunctionMethod

    def __init__(self, *args: Any, strategy: str = "ekfac", damping: float = 1e-3, relative_damping: bool = True,
                 curvature: str = "ggn", fisher: str = "true", fit_samples: int | None = None,
                 self_influence: bool = True, cg_iterations: int = 100,
                 cg_tol: float = 1e-6, lissa_depth: int = 1000, every_n_epochs: int | None = None,
                 at_fit_end: bool = True, projection: str = "sketch",
                 distributional: QueryLosses | SplitLosses | None = None, run_seed: int | None = None,
                 **kwargs: Any) -> None:
        if distributional is not None:
            check_loss_measurement(distributional, "distributional")
            if kwargs.get("group_by") is not None:
                raise ValueError(f"`distributional` needs one row per training example, but `group_by`="
                                 f"{kwargs['group_by']!r} attributes to groups; leave one of them out.")
        self.distributional, self.run_seed = distributional, None if run_seed is None else int(run_seed)
        self.result: RunResult | None = None
        self.settings = dict(strategy=strategy, damping=damping, relative_damping=relative_damping,
                             curvature=curvature, fisher=fisher, fit_samples=fit_samples, seed=kwargs.get("seed", 0),
                             self_influence=self_influence,
                             cg_iterations=cg_iterations, cg_tol=cg_tol, lissa_depth=lissa_depth)
        super().__init__(*args, every_n_epochs=every_n_epochs, at_fit_end=at_fit_end, projection=projection, **kwargs)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = self.distributional
        if m is None:
            return
        if result_seed(self.run_seed) is None:
            raise ValueError("`distributional` results are written with the run's seed: call "
                             "lightning.seed_everything(seed) before fit or pass `run_seed=` to InfluenceFunction.")
        bind_splits(m, trainer, self.keys["input_key"], self.keys["label_key"])  # SplitLosses: the same items

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # the final pass
        if self.distributional is None or trainer.fast_dev_run:
            return
        m = self.distributional
        scores = self.scores(loss_queries(m))  # every rank, from the stored files: all ranks agree
        with isolated(pl_module):
            value = measure_value(m, pl_module, dict(pl_module.named_parameters()))
        self.result = influence_run_result(scores, value, m.names, result_seed(self.run_seed))
        if trainer.is_global_zero:
            write_run_result(self.directory, self.result)
        if trainer.world_size > 1:
            trainer.strategy.barrier()

    @override
    def make_method(self) -> AttributionMethod:
        return InfluenceFunctionMethod(**self.settings)

    @classmethod
    @override
    def load(cls, dirpath: str, module: torch.nn.Module, normalize: Normalize | None = None,
             train_data: Dataset | DataLoader | None = None) -> Attribution:
        return Attribution.load(dirpath, module, normalize, method=cls.method_class.name, train_data=train_data)
