"""One training run's distributional-attribution result on disk: what a seed contributes to d-TDA.

A run (one seed) stores, in ``{folder}/distributional.safetensors`` (atomic, checksummed; see :mod:`lightning_attr.io`):

- ``examples`` (K,) int64: the training examples whose removal is predicted (dataset indices, sorted);
- ``value`` (Q,) float64: the measurements ``m(theta_T)`` of this run (e.g. Q query losses);
- ``change`` (K, Q) float64: the predicted change of each measurement when each example is removed from this run
  (``m(theta_T without k) - m(theta_T)``, first order: ``grad m^T r_T`` for unrolled differentiation, ``+score / N``
  for influence functions on query losses);

and in its metadata ``method`` (e.g. ``"unrolled-forward"``), ``seed`` and ``measurements`` (a name per column,
comma-separated). Every method that feeds :class:`~lightning_attr.distributional.DistributionalInfluence` writes this
one format; seeds are matched by the same ``examples`` and ``measurements``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_attr.io import CorruptArtifactError, load_tensors, save_tensors

__all__ = ["FILENAME", "RunResult", "read_run_result", "result_seed", "stack_results", "write_run_result"]

FILENAME = "distributional.safetensors"


@dataclass(frozen=True)
class RunResult:
    """One run's ``examples`` (K,), ``value`` (Q,), ``change`` (K, Q), ``method``, ``seed``, ``measurements`` (Q)."""

    examples: Tensor
    value: Tensor
    change: Tensor
    method: str
    seed: int
    measurements: tuple[str, ...]

    def __post_init__(self) -> None:
        k, q = self.examples.numel(), self.value.numel()
        if self.examples.dim() != 1 or self.value.dim() != 1 or tuple(self.change.shape) != (k, q):
            raise ValueError(f"a run result needs `examples` (K,), `value` (Q,) and `change` (K, Q); got "
                             f"{tuple(self.examples.shape)}, {tuple(self.value.shape)}, {tuple(self.change.shape)}.")
        if len(self.measurements) != q or any("," in m for m in self.measurements):
            raise ValueError(f"`measurements` must name each of the Q={q} columns (no commas), got "
                             f"{list(self.measurements)}.")


def result_seed(seed: int | None = None) -> int | None:
    """The seed a run's result is written with: ``seed`` when given, else the one ``lightning.seed_everything`` set
    (``PL_GLOBAL_SEED``), else None."""
    if seed is not None:
        return int(seed)
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env not in (None, "") else None


def write_run_result(folder: str, result: RunResult) -> str:
    """Write ``result`` to ``{folder}/distributional.safetensors`` (sorted by example), atomically; returns the path."""
    order = result.examples.argsort()
    tensors = {"examples": result.examples[order].long().cpu(), "value": result.value.double().cpu(),
               "change": result.change[order].double().cpu()}
    meta = {"method": result.method, "seed": str(int(result.seed)), "measurements": ",".join(result.measurements)}
    path = os.path.join(folder, FILENAME)
    save_tensors(path, tensors, meta)
    return path


def read_run_result(folder: str) -> RunResult:
    """The result stored in ``folder`` (checked against its digest); a missing or damaged file names itself."""
    path = os.path.join(folder, FILENAME)
    fix = "rerun this seed (a finished seed's folder holds it; delete the folder to start the seed again)"
    tensors, meta = load_tensors(path, fix=fix)
    try:
        return RunResult(tensors["examples"], tensors["value"], tensors["change"], meta["method"], int(meta["seed"]),
                         tuple(meta["measurements"].split(",")) if meta["measurements"] else ())
    except (KeyError, ValueError) as err:
        raise CorruptArtifactError(f"{path}: not a distributional run result ({err}); {fix}.") from err


def stack_results(results: list[RunResult]) -> tuple[Tensor, Tensor]:
    """``(X (S, Q), G (S, K, Q))`` of coupled seeds, after checking they answer the same question."""
    if not results:
        raise ValueError("no run results to stack: give at least two finished seeds.")
    first = results[0]
    seeds = [r.seed for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs share seeds {sorted({s for s in seeds if seeds.count(s) > 1})}: each seed must be one "
                         "independent run (same seed = same model, not a new sample).")
    for r in results[1:]:
        if not torch.equal(r.examples, first.examples) or r.measurements != first.measurements:
            raise ValueError(f"seed {r.seed} attributes other examples or measurements than seed {first.seed}; every "
                             "seed must run with the same `examples` and `measurements`.")
    return torch.stack([r.value for r in results]), torch.stack([r.change for r in results])
