"""AttributionWriter: ``trainer.predict`` (``lightning-attr predict``) saves the explainer's attributions (or the
valuation model's values) to a file."""

from __future__ import annotations

import os
from typing import Any, Sequence

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_attr.io import save_tensors
from lightning_attr.runs import run_directory

__all__ = ["AttributionWriter"]


def _gather(trainer: L.Trainer, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on all ranks (``[obj]`` without a process group)."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unique_rows(index: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Sort ``index`` (N,) and ``rows`` (N, ...) by index and keep one row per index (padding duplicates)."""
    order = torch.argsort(index, stable=True)
    index, rows = index[order], rows[order]
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = index[1:] != index[:-1]
    return index[keep], rows[keep]


class AttributionWriter(BasePredictionWriter):
    """Write the attributions of a predict run to ``{dirpath}/{filename}`` (default dirpath: the run's folder,
    :func:`~lightning_attr.runs.run_directory`), as safetensors written by :func:`~lightning_attr.io.save_tensors`:
    ``index`` (N,) int64 and each of ``keys`` (default ``attributions`` (N, d, K)) float32, one row per predicted
    example, sorted by index (``keys=[values, all_values]`` for a ``ValuationModel``).

    ``predict_step`` must return ``{"attributions": (B, d, K), "index": (B,)}`` (``AmortizedExplainer`` does); without
    ``"index"`` the sampler's dataset positions are used. Rows are gathered across ranks (duplicates that a
    ``DistributedSampler`` pads with are dropped) and written on rank zero; ``path`` holds the file written last.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "predictions.safetensors",
                 keys: list[str] | None = None) -> None:
        super().__init__(write_interval="batch")
        self.keys = list(keys or ["attributions"])
        if not filename.endswith(".safetensors"):
            raise ValueError(f"`filename` must end with '.safetensors', got {filename!r}; "
                             "e.g. 'predictions.safetensors'.")
        self.dirpath, self.filename = dirpath, filename
        self.path: str | None = None
        self._index: list[Tensor] = []
        self._rows: list[tuple[Tensor, ...]] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._index, self._rows = [], []

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if dataloader_idx:
            raise ValueError(f"AttributionWriter writes one predict dataloader, got `dataloader_idx`={dataloader_idx}; "
                             "predict each dataloader in its own run.")
        if not isinstance(prediction, dict) or any(k not in prediction for k in self.keys):
            got = sorted(prediction) if isinstance(prediction, dict) else type(prediction).__name__
            raise TypeError(f"AttributionWriter needs predict_step to return a dict with {self.keys} (`keys`) and "
                            f"'index' (B,); {type(pl_module).__name__} returned {got}.")
        index = prediction.get("index")
        if index is None:
            if batch_indices is None:
                raise ValueError("predict_step returned no 'index' and Lightning tracked no batch indices; return the "
                                 "batch's example index as prediction['index'].")
            rank_zero_warn("AttributionWriter: predict_step returned no 'index'; using the sampler's positions.")
            index = torch.as_tensor(list(batch_indices))
        self._index.append(torch.as_tensor(index).detach().long().cpu())
        self._rows.append(tuple(prediction[k].detach().float().cpu() for k in self.keys))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self.dirpath or run_directory(trainer)  # on every rank: run_directory broadcasts
        mine = None
        if self._rows:
            mine = (torch.cat(self._index), *(torch.cat(col) for col in zip(*self._rows)))
        parts = [p for p in _gather(trainer, mine) if p is not None]
        self._index, self._rows = [], []
        if not parts:
            rank_zero_warn("AttributionWriter: the predict run had no batches; nothing written.")
            return
        every = torch.cat([p[0] for p in parts])
        tensors = {}
        for i, key in enumerate(self.keys, start=1):
            index, tensors[key] = unique_rows(every, torch.cat([p[i] for p in parts]))
        self.path = os.path.join(folder, self.filename)
        if trainer.is_global_zero:
            save_tensors(self.path, {"index": index, **tensors}, {"rows": str(len(index))})
            rank_zero_info(f"Saved the {', '.join(self.keys)} of {len(index)} examples to {self.path}.")
