"""What the attribution callbacks read from a running Trainer: the training set, datamodule attributes, learning
rates, the collectives of its strategy, and the schedule of passes (at most one per optimizer step)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lightning_attr.influence.runner import AttributionData

__all__ = ["StrategyComm", "PassSchedule", "LearningRates", "bind_splits", "datamodule_attr", "split", "split_datasets",
           "train_data",
           "progress", "progress_bar"]


class StrategyComm:
    """The engine's collectives (:class:`~lightning_attr.influence.runner.Comm`) over a Trainer's strategy."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.strategy, self.world_size, self.rank = trainer.strategy, trainer.world_size, trainer.global_rank

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        return self.strategy.reduce(t, reduce_op="sum") if self.world_size > 1 else t

    def all_gather(self, t: Tensor) -> Tensor:
        return self.strategy.all_gather(t) if self.world_size > 1 else t.unsqueeze(0)

    def broadcast(self, obj: Any) -> Any:
        return self.strategy.broadcast(obj) if self.world_size > 1 else obj


class PassSchedule:
    """When passes run: every ``every_n_epochs`` epochs and / or ``every_n_steps`` optimizer steps, and / or at the end
    of fit; never before the first optimizer step and never twice for one step (``last_step``), whatever the
    triggers, gradient accumulation or epoch boundaries."""

    def __init__(self, every_n_epochs: int | None, every_n_steps: int | None, at_fit_end: bool) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be None or >= 1, got {value}.")
        if not every_n_epochs and not every_n_steps and not at_fit_end:
            raise ValueError("no attribution pass would run: set `every_n_epochs`, `every_n_steps` or `at_fit_end`.")
        self.every_n_epochs, self.every_n_steps, self.at_fit_end = every_n_epochs, every_n_steps, at_fit_end
        self.last_step = 0

    def after_batch(self, step: int) -> bool:
        return bool(self.every_n_steps) and step > self.last_step and step % self.every_n_steps == 0

    def after_epoch(self, epoch: int, step: int) -> bool:
        return bool(self.every_n_epochs) and step > self.last_step and (epoch + 1) % self.every_n_epochs == 0

    def at_end(self, step: int) -> bool:
        return self.at_fit_end and step > self.last_step


def datamodule_attr(dm: Any, name: str) -> tuple[Any, Any]:
    """``(value, owner)`` of attribute ``name`` on ``dm`` or on the datamodule it wraps (``dm.datamodule``, as an
    ``OracleDataModule`` does); ``(None, None)`` when neither has it."""
    for source in (dm, getattr(dm, "datamodule", None)):
        if source is not None and getattr(source, name, None) is not None:
            return getattr(source, name), source
    return None, None


def split(dm: Any, name: str) -> tuple[Dataset | None, Any]:
    """``(dataset, owner)`` of split ``name`` in a datamodule's ``splits`` dict (see ``datamodule_attr``)."""
    for source in (dm, getattr(dm, "datamodule", None)):
        splits = getattr(source, "splits", None)
        if isinstance(splits, dict) and name in splits:
            return splits[name], source
    return None, None


def split_datasets(dm: Any, names: Iterable[str]) -> dict[str, Dataset]:
    """``{name: dataset}`` of each split in ``names`` from a datamodule's ``splits`` (see :func:`split`); a
    ``ValueError`` naming the missing splits and the ones there are."""
    found = {name: split(dm, name)[0] for name in names}
    missing = [name for name, data in found.items() if data is None]
    if missing:
        there, _ = datamodule_attr(dm, "splits")
        have = sorted(there) if isinstance(there, dict) else "no `splits` dict"
        raise ValueError(f"the measurements take their queries from the data split(s) {missing}, but the datamodule "
                         f"({type(dm).__name__}) has {have}; name one of its splits, use a datamodule with a `splits` "
                         "dict (lightning_attr.ImageDataModule), or bind the measurement yourself: "
                         "`m.bind({'val': dataset})`.")
    return found


def bind_splits(measurement: Any, trainer: L.Trainer, input_key: str, label_key: str) -> None:
    """Give a measurement that takes its queries from data splits (``measurement.splits``, e.g. ``SplitLosses``)
    those splits of the trainer's datamodule (:func:`split_datasets`); nothing for one that holds its queries."""
    if measurement.splits:
        measurement.bind(split_datasets(trainer.datamodule, measurement.splits), input_key, label_key)


def train_data(trainer: L.Trainer, batch_size: int | None = None) -> AttributionData:
    """The fit's training data, unshuffled: the datamodule's ``splits["train"]`` (``ImageDataModule``, or one wrapping
    it as ``.datamodule``), else the dataset (with collate_fn and workers) behind ``trainer.train_dataloader``."""
    data, source = split(trainer.datamodule, "train")
    if data is not None:
        return AttributionData(data, batch_size or getattr(source, "batch_size", None) or 64)
    loader = trainer.train_dataloader
    if isinstance(loader, DataLoader):
        return AttributionData(loader.dataset, batch_size or loader.batch_size or 64, loader.collate_fn,
                               loader.num_workers)
    raise ValueError("cannot find the training set for the attribution pass (train_dataloader is "
                     f"{type(loader).__name__}); pass `attribution_data=` (a Dataset or an unshuffled DataLoader).")


class LearningRates:
    """Per-parameter learning rates as the optimizers hold them: ``snap`` at a batch start keeps the rate of the step
    about to run (epoch-interval schedulers step before epoch-end hooks); ``of(names)`` reads that snapshot."""

    def __init__(self) -> None:
        self.groups: dict[str, dict] = {}
        self.snapshot: dict[int, float] | None = None

    def snap(self, trainer: L.Trainer, module: torch.nn.Module) -> None:
        if not self.groups:
            by_id = {id(p): g for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            self.groups = {n: by_id[id(p)] for n, p in module.named_parameters() if id(p) in by_id}
        self.snapshot = {id(g): float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups}

    def of(self, names: list[str]) -> dict[str, float]:
        """The snapshot's rate of each parameter in ``names``; raises naming those in no optimizer param group."""
        missing = [n for n in names if n not in self.groups]
        if missing:
            raise ValueError(f"parameters {missing[:5]} are in no optimizer param group, so TracIn has no learning "
                             "rate for them; exclude them with `parameters=` / `module_types=`.")
        return {n: self.snapshot[id(self.groups[n])] for n in names}


def _shows_progress(trainer: L.Trainer) -> bool:
    return trainer.is_global_zero and trainer.progress_bar_callback is not None


def progress(trainer: L.Trainer, desc: str) -> Callable[[Iterable, int], Iterable]:
    """A tqdm bar on rank zero when the trainer shows one: ``bar(iterable, total)``."""
    show = _shows_progress(trainer)
    return lambda it, total: tqdm(it, desc=desc, total=total, disable=not show, leave=False, dynamic_ncols=True)


def progress_bar(trainer: L.Trainer, desc: str, total: int) -> tqdm:
    """A tqdm bar of ``total`` steps to ``update()`` by hand, shown on rank zero when the trainer shows one."""
    return tqdm(desc=desc, total=total, disable=not _shows_progress(trainer), leave=False, dynamic_ncols=True)
