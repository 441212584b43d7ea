"""The per-seed influence function as a d-TDA estimator: one run's :class:`RunResult` from influence scores.

For query losses ``f_q`` the influence function predicts the change of each query's loss when training example ``k`` is
removed from the N training examples as ``f_q(theta without k) - f_q(theta) ~ +score(k, q) / N`` (sign and 1/N:
:mod:`lightning_attr.influence.influence_function`), so a run contributes ``examples = 0..N-1``, ``value = f(theta_T)``
(Q,) and ``change = scores / N`` (N, Q) (method ``"influence_function"``), the format of
:mod:`lightning_attr.distributional.results`. The influence function's queries are cross-entropy losses, so only
cross-entropy :class:`QueryLosses` / :class:`SplitLosses` measurements are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_attr.distributional.measurements import LOSSES, Measurement, QueryLosses, SplitLosses
from lightning_attr.distributional.results import RunResult

__all__ = ["IF_METHOD", "check_loss_measurement", "influence_run_result", "loss_queries"]

IF_METHOD = "influence_function"


def check_loss_measurement(measurement: Measurement, argument: str = "distributional") -> None:
    """A ``ValueError`` naming ``argument`` unless ``measurement`` is cross-entropy query losses (``QueryLosses`` or
    ``SplitLosses``): the only measurements whose change an influence function on query losses predicts."""
    if not isinstance(measurement, (QueryLosses, SplitLosses)):
        raise ValueError(f"`{argument}` must be QueryLosses or SplitLosses (the influence function's queries are "
                         f"losses), got {type(measurement).__name__}; logits or other measurements need "
                         "UnrolledDifferentiation.")
    if measurement.loss is not LOSSES["cross_entropy"]:
        raise ValueError(f"`{argument}` must measure the cross-entropy loss (the loss the influence function's "
                         f"query gradients are taken of), got loss={getattr(measurement.loss, '__name__', '?')!r}.")


def loss_queries(measurement: QueryLosses | SplitLosses) -> TensorDataset:
    """The queries of ``measurement`` as a dataset of ``(input, label)`` items in column order, the form the
    attribution's ``scores(query)`` takes (a ``SplitLosses`` must be bound first)."""
    if isinstance(measurement, SplitLosses):
        if measurement.inputs is None:
            raise RuntimeError(f"SplitLosses(split={measurement.split!r}) has no queries yet: bind it first.")
        return TensorDataset(measurement.inputs, torch.as_tensor(measurement.labels))
    return TensorDataset(measurement.inputs, measurement.targets)


def influence_run_result(scores: Tensor, value: Tensor, measurements: Sequence[str], seed: int) -> RunResult:
    """One run's result from influence ``scores`` (N, Q) of every training example on Q query losses and the losses
    ``value`` (Q,) at the final weights: ``change = scores / N`` (the first-order change of each query's loss when each
    example is removed), ``examples = 0..N-1``."""
    n = scores.shape[0]
    return RunResult(torch.arange(n), value.detach().double().cpu(), scores.detach().double().cpu() / n, IF_METHOD,
                     int(seed), tuple(measurements))
