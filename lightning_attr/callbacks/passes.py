"""Plumbing of an attribution pass: RNG / mode isolation, the sharded unshuffled loader, and gathers by index."""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_attr.data.samplers import UnpaddedDistributedSampler

__all__ = ["isolated", "attribution_loader", "gather_by_index", "train_dataset", "datamodule_attr"]


@contextlib.contextmanager
def isolated(module: torch.nn.Module) -> Iterator[None]:
    """Run a block in eval mode and restore train/eval flags and the Python / NumPy / torch (CPU, CUDA) RNG states."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, flag in modes.items():
            m.training = flag
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


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


def train_dataset(trainer: L.Trainer) -> tuple[Dataset, Any, int | None]:
    """``(dataset, collate_fn, batch_size)`` of the fit's training data, unshuffled.

    A datamodule with ``splits["train"]`` (``ImageDataModule``, or one wrapping it as ``.datamodule``) gives its
    train split; otherwise the dataset behind ``trainer.train_dataloader``.
    """
    data, source = split(trainer.datamodule, "train")
    if data is not None:
        return data, None, getattr(source, "batch_size", None)
    loader = trainer.train_dataloader
    if isinstance(loader, DataLoader):
        return loader.dataset, loader.collate_fn, loader.batch_size
    raise ValueError("cannot find the training set for the attribution pass (train_dataloader is "
                     f"{type(loader).__name__}); pass `attribution_data=` (a Dataset or an unshuffled DataLoader).")


def attribution_loader(data: Dataset | DataLoader, batch_size: int, world_size: int = 1, rank: int = 0,
                       collate_fn: Any = None, num_workers: int = 0) -> DataLoader:
    """Unshuffled loader over ``data``; rank ``r`` of ``w`` reads examples ``r, r + w, ...`` (no padding)."""
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler) or getattr(data.sampler, "shuffle", False):
            raise ValueError("`attribution_data` is a shuffled DataLoader; the attribution pass needs a fixed order "
                             "over stable indices: pass the Dataset or a DataLoader with shuffle=False.")
        collate_fn, num_workers, data = data.collate_fn, data.num_workers, data.dataset
    sampler = UnpaddedDistributedSampler(data, world_size, rank) if world_size > 1 else None
    kw = {} if collate_fn is None else {"collate_fn": collate_fn}
    return DataLoader(data, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers, **kw)


def gather_by_index(trainer: L.Trainer, index: Tensor, values: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """Per-example ``values`` (n_local, ...) of each rank's shard -> (n, ...) in dataset order on every rank.

    Shards may differ in length by one; they are padded for the collective and the padding dropped again. Raises when
    an index is out of range, duplicated, or missing.
    """
    world = trainer.world_size
    if world > 1:
        counts = trainer.strategy.all_gather(torch.tensor([index.numel()], device=index.device)).flatten()
        size = int(counts.max())
        pad = size - index.numel()
        index = trainer.strategy.all_gather(torch.cat([index, index.new_full((pad,), -1)])).flatten()
        gathered = {}
        for k, v in values.items():
            v = torch.cat([v, v.new_zeros(pad, *v.shape[1:])])
            gathered[k] = trainer.strategy.all_gather(v).flatten(0, 1)
        values = gathered
    keep = index >= 0
    index = index[keep].long().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"example indices must lie in [0, {n}); got range [{int(index.min())}, {int(index.max())}].")
    if index.numel() != n or torch.unique(index).numel() != n:
        raise ValueError(f"the attribution pass saw {torch.unique(index).numel()} distinct indices in {index.numel()} "
                         f"examples; expected each of the {n} training examples exactly once (stable `index` per item).")
    out = {}
    for k, v in values.items():
        v = v[keep.to(v.device)].cpu()
        full = v.new_empty(n, *v.shape[1:])
        full[index] = v
        out[k] = full
    return out
