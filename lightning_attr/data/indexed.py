"""Stable example indices for attribution: ``IndexedDataset`` and the batch unpacking the callbacks use."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

__all__ = ["IndexedDataset", "items_at", "unpack_batch"]


class IndexedDataset(Dataset):
    """Wrap ``dataset`` so each item carries its position: dict items get ``index_key``; tuples become
    ``(*item, index)``; anything else becomes ``(item, index)``."""

    def __init__(self, dataset: Dataset, index_key: str = "index") -> None:
        self.dataset, self.index_key = dataset, index_key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            return {**item, self.index_key: i}
        if isinstance(item, (tuple, list)):
            return (*item, i)
        return item, i


def unpack_batch(batch: Any, input_key: str = "image", label_key: str = "label", index_key: str = "index"
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``(inputs, labels, indices)`` of a dict batch (by key) or a tuple batch ``(inputs, labels, ..., indices)``."""
    if isinstance(batch, Mapping):
        missing = [k for k in (input_key, label_key, index_key) if k not in batch]
        if missing:
            raise ValueError(f"batch has no key(s) {missing} (keys: {sorted(batch)}); attribution needs inputs, labels "
                             "and a stable example index: set `input_key` / `label_key` / `index_key`, or wrap the "
                             "dataset in `lightning_attr.data.IndexedDataset`.")
        x, y, idx = batch[input_key], batch[label_key], batch[index_key]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 3:
        x, y, idx = batch[0], batch[1], batch[-1]
    else:
        raise ValueError(f"batch of type {type(batch).__name__} (length {len(batch) if hasattr(batch, '__len__') else '?'})"
                         " carries no example index; wrap the dataset in `lightning_attr.data.IndexedDataset` so "
                         "batches are (inputs, labels, index).")
    idx = torch.as_tensor(idx)
    if idx.dtype.is_floating_point or idx.dim() != 1:
        raise ValueError(f"example indices must be a 1-D integer tensor, got dtype {idx.dtype}, shape {tuple(idx.shape)}.")
    return x, torch.as_tensor(y), idx


def items_at(dataset: Dataset, indices: Sequence[int], input_key: str = "image", label_key: str = "label",
             collate_fn: Callable[[list], Any] | None = None) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of ``dataset``'s items at ``indices`` (positions), collated into one batch
    (``collate_fn``, default torch's ``default_collate``) and unpacked like a training batch (:func:`unpack_batch`:
    dict items by key, tuple items ``(inputs, labels, ...)``)."""
    rows = IndexedDataset(dataset)
    batch = (collate_fn or default_collate)([rows[int(i)] for i in indices])
    x, y, _ = unpack_batch(batch, input_key, label_key)
    return x, y
