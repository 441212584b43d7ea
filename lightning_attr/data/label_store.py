"""Per-example oracle labels kept in memory and persisted atomically, one file per rank, merged by example index."""

from __future__ import annotations

import glob

import torch
from torch import Tensor

from lightning_attr.io import atomic_save

__all__ = ["LabelStore"]


class LabelStore:
    """Labels (n, *shape) with a draw count per example.

    ``path_prefix``: when given, labels are loaded from every ``{path_prefix}-rank*.pt`` at creation and
    :meth:`save` writes this process's labels to ``{path_prefix}-rank{rank}.pt``, so any number of processes can
    share one cache and a later run with another world size reads it back.
    """

    def __init__(self, n: int, path_prefix: str | None = None, rank: int = 0) -> None:
        self.n = n
        self.values: Tensor | None = None
        self.count = torch.zeros(n, dtype=torch.long)
        self.path_prefix, self.rank = path_prefix, rank
        if path_prefix:
            for file in sorted(glob.glob(f"{glob.escape(path_prefix)}-rank*.pt")):
                saved = torch.load(file, map_location="cpu", weights_only=True)
                self.put(saved["index"], saved["values"])

    def has(self, index: Tensor) -> Tensor:
        """Boolean (B,) : which of ``index`` already have a label."""
        return self.count[index.cpu()] > 0

    def get(self, index: Tensor) -> Tensor:
        assert self.values is not None
        return self.values[index.cpu()]

    def put(self, index: Tensor, values: Tensor) -> None:
        """Store (B, ...) ``values`` for ``index`` (replacing earlier ones)."""
        index, values = index.cpu(), values.detach().float().cpu()
        if self.values is None:
            self.values = torch.zeros(self.n, *values.shape[1:])
        self.values[index] = values
        self.count[index] = self.count[index].clamp(min=1)

    def update_mean(self, index: Tensor, values: Tensor) -> Tensor:
        """Fold a new draw into the running mean of each example and return the means (B, ...)."""
        index, values = index.cpu(), values.detach().float().cpu()
        if self.values is None:
            self.values = torch.zeros(self.n, *values.shape[1:])
        c = self.count[index].unsqueeze(-1).view(-1, *([1] * (values.dim() - 1))).float()
        self.values[index] = (self.values[index] * c + values) / (c + 1)
        self.count[index] += 1
        return self.values[index]

    def save(self) -> None:
        """Write the labels this store holds for its rank's examples (no-op without ``path_prefix``)."""
        if not self.path_prefix or self.values is None:
            return
        index = torch.nonzero(self.count > 0).flatten()
        atomic_save({"index": index, "values": self.values[index]}, f"{self.path_prefix}-rank{self.rank}.pt")

    def state_dict(self) -> dict:
        return {"values": self.values, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.count = state["values"], state["count"]
