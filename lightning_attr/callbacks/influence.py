"""The Lightning shell of the data-attribution callbacks: when passes run, DDP and RNG isolation, state, logging.

The work is done by the engine in :mod:`lightning_attr.influence`: an :class:`AttributionMethod` (the math), a
:class:`PassRunner` (the loop over rows, sharded and gathered), and an :class:`Attribution` (stored checkpoints and the
answers: ``self_influence``, ``scores``, ``topk``). Subclasses name their method in ``method_class``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, ClassVar, Literal, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_attr.callbacks.answers import Answers
from lightning_attr.callbacks.context import (
    LearningRates,
    PassSchedule,
    StrategyComm,
    progress,
    train_data,
)
from lightning_attr.callbacks.reporting import Reporter
from lightning_attr.callbacks.variants import VariantCallback
from lightning_attr.influence.attribution import Attribution
from lightning_attr.influence.grouping_pass import GroupSpec
from lightning_attr.influence.isolation import isolated
from lightning_attr.influence.method import AttributionMethod
from lightning_attr.influence.runner import AttributionData, PassRunner
from lightning_attr.influence.store import ResultsStore
from lightning_attr.runs import run_directory

__all__ = ["InfluenceCallback"]


class InfluenceCallback(Answers, VariantCallback):
    """Base of :class:`TracIn` and :class:`TRAK`; see :class:`TracIn` for the arguments."""

    method_class: ClassVar[type[AttributionMethod]]

    def __init__(self, dirpath: str | None = None, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                 at_fit_end: bool = False, parameters: Sequence[str] | None = None,
                 module_types: Sequence[str] | None = None, last_layer: bool = False, proj_dim: int | None = 2048,
                 projection: str = "auto", proj_type: str = "rademacher", seed: int = 0, max_memory_mb: float = 1024.0,
                 cache_inputs_mb: float = 512.0, batch_size: int | None = None,
                 attribution_data: Dataset | DataLoader | None = None, query_data: Dataset | None = None,
                 num_queries: int = 8, top_k: int = 5, noisy_labels: str | Sequence[int] | Tensor | None = None,
                 input_key: str = "image", label_key: str = "label", index_key: str = "index",
                 progress_bar: bool = True, prefix: str | None = None, group_by: str | None = None,
                 num_groups: int | None = None, group_size: int | None = None, group_column: str | None = None,
                 group_seed: int = 0, normalize: Literal["mean", "sum"] = "mean") -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.schedule = PassSchedule(every_n_epochs, every_n_steps, at_fit_end)
        self.gradients = dict(parameters=parameters, module_types=module_types, last_layer=last_layer,
                              proj_dim=proj_dim, projection=projection, proj_type=proj_type, seed=seed,
                              max_memory_mb=max_memory_mb)
        self.group_spec = GroupSpec(group_by, num_groups, group_size, group_column, group_seed)
        self.keys = dict(input_key=input_key, label_key=label_key, index_key=index_key)
        self.runner = PassRunner(self.keys, cache_inputs_mb)
        self.reporter = Reporter(query_data, num_queries, top_k, noisy_labels, self.keys)
        self.dirpath, self.batch_size, self.attribution_data = dirpath, batch_size, attribution_data
        self.progress_bar, self.normalize = progress_bar, normalize
        self.prefix = prefix or self.method_class.name + ("_last_layer" if last_layer else "") + (
            "_grouped" if group_by else "")
        self.method = self.make_method()
        self.attribution: Attribution | None = None
        self.metrics: dict[str, float] = {}
        self.rates = LearningRates()
        self._pending: dict[str, Any] | None = None

    def make_method(self) -> AttributionMethod:
        return self.method_class()

    @property
    @override
    def state_key(self) -> str:
        """The prefix and the settings that define the results, not ``dirpath``: a resume into another folder still
        finds its state. Lightning reads it at every hook call, so it is kept per method object."""
        if getattr(self, "_state_key", (None,))[0] is not self.method:
            settings = dict(method=self.method.config(), gradients=self.gradients, groups=vars(self.group_spec),
                            schedule=vars(self.schedule) | {"last_step": None})
            digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
            self._state_key = (self.method, self._generate_state_key(prefix=self.prefix, settings=digest))
        return self._state_key[1]

    # ------------------------------------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.attribution is None or self.attribution.module is not pl_module:
            directory = self.dirpath or os.path.join(run_directory(trainer), self.prefix)
            taken = {cb.directory: cb for cb in trainer.callbacks
                     if cb is not self and isinstance(cb, InfluenceCallback) and cb.attribution is not None}
            if os.path.abspath(directory) in taken:
                raise ValueError(f"{type(self).__name__} and {type(taken[os.path.abspath(directory)]).__name__} would "
                                 f"both write to {directory} (prefix {self.prefix!r}): give each its own `prefix=`.")
            self.attribution = Attribution(self.method, pl_module, self.gradients, ResultsStore(directory),
                                           self.normalize, self.keys)
        self._trainer = trainer
        if self._pending is not None:
            self.load_state_dict(self._pending)

    @property
    def directory(self) -> str:
        """Folder of the stored results (per-checkpoint rows and weights, summary, indexes, top-k JSON)."""
        if self.attribution is None:
            raise RuntimeError("the callback has not been set up by a Trainer yet.")
        return self.attribution.store.directory

    def _data(self, trainer: L.Trainer) -> AttributionData:
        if self.attribution_data is not None:
            return AttributionData.of(self.attribution_data, self.batch_size, "attribution_data")
        return train_data(trainer, self.batch_size)

    # ----------------------------------------------------------------------------------------------------- triggers
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rates = LearningRates()  # this fit's optimizers

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.method.uses_lr:
            self.rates.snap(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.schedule.after_batch(trainer.global_step):
            self.run_pass(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.after_epoch(trainer.current_epoch, trainer.global_step):
            self.run_pass(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.at_end(trainer.global_step):
            self.run_pass(trainer, pl_module)

    # --------------------------------------------------------------------------------------------------------- pass
    def _bar(self, trainer: L.Trainer, desc: str):
        return progress(trainer, desc) if self.progress_bar else None

    def run_pass(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One attribution pass at the current weights (all ranks), then storage and logging (rank zero)."""
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        att, comm, data = self.attribution, StrategyComm(trainer), self._data(trainer)
        c = att.num_checkpoints
        if self.method.uses_lr and self.rates.snapshot is None:
            self.rates.snap(trainer, pl_module)
        queries = self.reporter.queries(trainer)
        with isolated(pl_module):
            att.add_pass(self.runner, data, comm, self.group_spec, dict(epoch=trainer.current_epoch,
                         step=trainer.global_step), self.rates.of, None if queries is None else queries[:2],
                         lambda desc: self._bar(trainer, f"{self.prefix} {desc} (step {trainer.global_step})"))
        self.schedule.last_step = trainer.global_step
        att.save(comm)
        if trainer.is_global_zero:
            dataset = data.dataset if att.grouping.is_identity else None
            self.metrics = self.reporter.report(trainer, att, self.prefix, f"{c:03d}", dataset)
        if trainer.world_size > 1:
            trainer.strategy.barrier()

    # -------------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return dict(attribution=self.attribution.state_dict() if self.attribution else None,
                    method=self.method.name, method_config=self.method.config())

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.method = type(self.method)(**state_dict["method_config"])
        if self.attribution is None:  # not set up yet: applied in setup
            self._pending = state_dict
            return
        self._pending = None
        self.attribution.method = self.method
        saved = state_dict["attribution"]
        if saved is None:
            return
        self.attribution.load_state_dict(saved)
        if self.attribution.records:
            self.schedule.last_step = self.attribution.records[-1]["step"]
        if os.path.abspath(saved["directory"]) != self.attribution.store.directory:
            if self._trainer.is_global_zero:
                n = self.attribution.adopt(saved["directory"])
                rank_zero_warn(f"{type(self).__name__} resumed with results folder {self.directory}; the {n} "
                               f"checkpoints stored before in {saved['directory']} were copied there.")
