"""Reverse mode of :class:`~lightning_attr.callbacks.UnrolledDifferentiation`: record during training what an exact
replay of the run needs, and sweep backward over it at fit end (math: :mod:`lightning_attr.distributional.reverse`).

Recorded per optimizer step (in ``on_before_optimizer_step``: every micro-batch of the step has been trained, the
weights are still ``theta_t``): the dataset indices and loss weights of every micro-batch of the GLOBAL step (under DDP
gathered from every process, :func:`~lightning_attr.distributional.recording.gather_step`), the SGD settings the
optimizer holds, and every ``checkpoint_every`` steps the weights and momentum buffers (copies on CPU). At fit end the
rows are read back from the training set (the train loader's dataset and ``collate_fn``, through the same precision
conversion and batch-transfer hooks as a training batch) and :func:`~lightning_attr.distributional.reverse.
reverse_sweep` recomputes the weights between checkpoints and sweeps the adjoint from ``grad m(theta_T)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import default_collate

from lightning_attr.callbacks.context import StrategyComm, progress_bar, train_data
from lightning_attr.data.indexed import unpack_batch
from lightning_attr.distributional.measurements import Measurement, value_and_jacobian
from lightning_attr.distributional.optimizers import (
    SGDHyperparameters,
    hyperparameters_by_name,
    momentum_buffers_by_name,
)
from lightning_attr.distributional.recording import gather_step, sweep_in_shares
from lightning_attr.distributional.results import RunResult, write_run_result
from lightning_attr.distributional.reverse import DataFn, RecordedBatch, Trajectory, reverse_sweep
from lightning_attr.distributional.tracking import batch_statistics, micro_batch, trained_parameters
from lightning_attr.distributional.unrolled import LossFn
from lightning_attr.influence.isolation import isolated
from lightning_attr.influence.runner import AttributionData

__all__ = ["DEFAULT_EVERY", "METHOD", "ReverseRecorder", "check_every", "training_rows"]

METHOD = "unrolled-reverse"
DEFAULT_EVERY = 32


def check_every(value: Any) -> int:
    """``value`` as an int >= 1, or a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`checkpoint_every` must be an int >= 1 (store the weights every that many optimizer steps; "
                         f"the sweep recomputes the steps between), got {value!r}.")
    return value


def training_rows(trainer: L.Trainer, module: L.LightningModule, source: AttributionData, keys: dict[str, str]
                  ) -> DataFn:
    """``data(indices) -> (inputs, targets)``: the training set's items at ``indices`` collated like a training
    batch and put through what Lightning's training loop applies to one (precision conversion, the
    ``on_before_batch_transfer`` / ``transfer_batch_to_device`` / ``on_after_batch_transfer`` hooks)."""
    collate = source.collate_fn or default_collate

    def rows(indices: Tensor) -> tuple[Any, Tensor]:
        batch = collate([source.dataset[i] for i in indices.tolist()])
        batch = trainer.precision_plugin.convert_input(batch)
        batch = module._on_before_batch_transfer(batch, dataloader_idx=0)  # as Lightning's training epoch loop
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        x, y, idx = unpack_batch(batch, **keys)
        if not torch.equal(idx.cpu().long(), indices.cpu().long()):
            raise ValueError(f"the training set's items at {indices.tolist()[:5]} carry the indices "
                             f"{idx.tolist()[:5]}: each item must carry its own position (wrap the dataset in "
                             "lightning_attr.data.IndexedDataset).")
        return x, y

    return rows


def _compact(hyper: dict[str, SGDHyperparameters]) -> SGDHyperparameters | dict[str, SGDHyperparameters]:
    """One settings object when every parameter shares it (a smaller record), else the mapping."""
    distinct = set(hyper.values())
    return next(iter(distinct)) if len(distinct) == 1 else hyper


class ReverseRecorder:
    """The recording and the sweep of reverse mode (the callback calls it from its hooks; see the module docstring).

    ``trajectory`` counts steps from ``first_step`` (the trainer's global step when recording began)."""

    def __init__(self, every: int, loss_fn: LossFn, loss_reduction: str, keys: dict[str, str]) -> None:
        self.every, self.loss_fn, self.loss_reduction = check_every(every), loss_fn, loss_reduction
        self.keys = keys
        self.trajectory: Trajectory | None = None
        self.first_step = 0
        self._pending: list[RecordedBatch] = []
        self._loaded: dict[str, Any] | None = None
        self._modes: dict[str, bool] = {}

    # ------------------------------------------------------------------------------------------------- recording
    def start(self, trainer: L.Trainer, module: nn.Module) -> None:
        """A new trajectory, or the checkpoint's (resumed fit), checked against where training resumes."""
        params = trained_parameters(module, trainer.optimizers[0])
        self._pending, loaded, self._loaded = [], self._loaded, None
        if loaded is None:
            if trainer.global_step > 0:
                rank_zero_warn(f"UnrolledDifferentiation (reverse mode) starts recording at step "
                               f"{trainer.global_step}: "
                               "the checkpoint holds no trajectory for this `prefix`, so only the steps from here on "
                               "are attributed (resume with the callback settings of the interrupted run).")
            self.trajectory, self.first_step = Trajectory(every=self.every, storage="cpu"), trainer.global_step
        else:
            self.trajectory = Trajectory.from_state_dict(loaded["trajectory"], storage="cpu")
            self.first_step = int(loaded["first_step"])
            self._check_resumed(trainer.global_step, params)
        self._announce(trainer, params)

    def _check_resumed(self, global_step: int, params: dict[str, Tensor]) -> None:
        end = self.first_step + self.trajectory.num_steps
        if end != global_step:
            raise ValueError(f"the checkpoint's UnrolledDifferentiation trajectory ends at step {end} but training "
                             f"resumes at step {global_step}; resume from a checkpoint saved by this run between "
                             "optimizer steps.")
        stored = next(iter(self.trajectory.checkpoints.values()), None)
        shapes = {n: p.shape for n, p in params.items()}
        if stored is not None and {n: t.shape for n, t in stored.params.items()} != shapes:
            differ = sorted(set(stored.params) ^ set(params))[:5] or "other shapes"
            raise ValueError(f"the checkpoint's UnrolledDifferentiation trajectory stores other parameters than the "
                             f"module trains ({differ}); resume with the same module and optimizer.")

    def _announce(self, trainer: L.Trainer, params: dict[str, Tensor]) -> None:
        p = sum(t.numel() for t in params.values())
        momentum = any(g.get("momentum", 0) for g in trainer.optimizers[0].param_groups)
        mb = (2 if momentum else 1) * p * next(iter(params.values())).element_size() / 2**20
        total = trainer.estimated_stepping_batches
        whole = (f", about {mb * math.ceil(total / self.every):.3g} MB for {int(total)} steps"
                 if math.isfinite(total) else "")
        stored = "weights and momentum buffers" if momentum else "weights"
        rank_zero_info(f"UnrolledDifferentiation (reverse mode): recording each optimizer step's rows and SGD "
                       f"settings, and the {stored} every {self.every} steps on CPU ({mb:.3g} MB each{whole}, also in "
                       "checkpoints); at fit end one backward sweep costs about one gradient plus one Jacobian-vector "
                       "product per measurement per step.")

    def batch(self, trainer: L.Trainer, batch: Any) -> None:
        """Keep a training micro-batch's dataset indices and loss weights until its optimizer step."""
        x, y, idx = unpack_batch(batch, **self.keys)
        weights = micro_batch(x, y, idx, trainer.accumulate_grad_batches, trainer.world_size,
                              self.loss_reduction).weights
        self._pending.append(RecordedBatch(idx, weights))

    def step(self, trainer: L.Trainer, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Record optimizer step ``t`` at ``theta_t``: the global step's rows, its settings, a checkpoint when due."""
        pending, self._pending = self._pending, []
        if self.trajectory is None:
            return
        if not pending:
            rank_zero_warn("UnrolledDifferentiation (reverse mode): an optimizer step without training batches "
                           "(resumed in the middle of gradient accumulation?) cannot be replayed; recording stops "
                           "and no result is written.")
            self.trajectory = None
            return
        comm = StrategyComm(trainer)
        params = trained_parameters(module, optimizer)
        device = next(iter(params.values())).device
        batches = gather_step(pending, comm.all_gather if comm.world_size > 1 else None, device)
        t = self.trajectory.num_steps
        if self.trajectory.due(t):
            self.trajectory.checkpoint(t, params, momentum_buffers_by_name(optimizer, params))
        self.trajectory.record_step(batches, _compact(hyperparameters_by_name(optimizer, params)))
        self._modes = {name: m.training for name, m in module.named_modules()}

    def log(self, trainer: L.Trainer, prefix: str) -> None:
        """Log ``{prefix}/steps_recorded`` (rank zero)."""
        if self.trajectory is not None and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"{prefix}/steps_recorded": float(self.trajectory.num_steps)},
                                   step=trainer.global_step)

    # ---------------------------------------------------------------------------------------------------- sweep
    def finish(self, trainer: L.Trainer, module: nn.Module, measurement: Measurement, seed: int, directory: str
               ) -> RunResult | None:
        """At fit end, on every process: the sweep's :class:`RunResult` (all N examples), written by rank zero to
        ``{directory}/distributional.safetensors``; None (with a warning) when no step was recorded."""
        if self.trajectory is None or self.trajectory.num_steps == 0:
            rank_zero_warn("UnrolledDifferentiation (reverse mode) recorded no optimizer step in this fit: no result "
                           "is written.")
            return None
        value, change = self.sweep(trainer, module, measurement)
        result = RunResult(torch.arange(change.shape[0]), value.detach().cpu(), change.detach().cpu(), METHOD,
                           int(seed), tuple(measurement.names))
        if trainer.is_global_zero:
            write_run_result(directory, result)
        if trainer.world_size > 1:
            trainer.strategy.barrier()
        return result

    def sweep(self, trainer: L.Trainer, module: nn.Module, measurement: Measurement) -> tuple[Tensor, Tensor]:
        """``(value (Q,), change (N, Q))`` at the trained weights, the same on every process: the predicted change
        of each measurement when each training example is removed (:func:`reverse_sweep`, the columns shared out
        over processes by :func:`sweep_in_shares`)."""
        params = {n: p.detach() for n, p in trained_parameters(module, trainer.optimizers[0]).items()}
        with isolated(module):
            value, jacobian = value_and_jacobian(measurement, module, params)
        source = train_data(trainer)
        sweep = self._columns(module, jacobian, params, training_rows(trainer, module, source, self.keys),
                              len(source.dataset), progress_bar(trainer, "d-TDA reverse sweep",
                                                                self.trajectory.num_steps))
        comm = StrategyComm(trainer)
        change = sweep_in_shares(sweep, value.numel(), comm.rank, comm.world_size, comm.all_gather)
        return value, change

    def _columns(self, module: nn.Module, jacobian: dict[str, Tensor], params: dict[str, Tensor], data: DataFn,
                 n: int, bar: Any) -> Callable[[list[int]], Tensor]:
        """``columns -> (N, len(columns))``: the sweep of those measurements, the module in its training modes
        (batch norm on batch statistics, running statistics untouched), RNG and modes restored afterwards."""
        modes = self._modes or {name: m.training for name, m in module.named_modules()}

        def sweep(columns: list[int]) -> Tensor:
            grads = {k: g[columns] for k, g in jacobian.items()}
            try:
                with isolated(module):
                    for name, m in module.named_modules():
                        m.training = modes.get(name, m.training)
                    with batch_statistics(module):
                        return reverse_sweep(module, self.trajectory, data, self.loss_fn, grads, n, final_params=params, on_step=lambda _: bar.update())
            finally:
                bar.close()

        return sweep

    # ---------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.trajectory is None:
            return dict(self._loaded or {})
        return {"first_step": self.first_step, "trajectory": self.trajectory.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._loaded = dict(state_dict)
