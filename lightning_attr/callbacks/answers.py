"""What the attribution callbacks answer after (or during) fit, delegated to their :class:`Attribution`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_attr.callbacks.deprecated import GroupAliases
from lightning_attr.influence.attribution import Attribution, Normalize
from lightning_attr.influence.groups import Grouping
from lightning_attr.influence.topk import TopK

__all__ = ["Answers"]


class Answers(GroupAliases):
    """``self_influence``, ``scores``, ``topk``, ``groups``, ``records`` and ``load`` of a callback that holds an
    ``attribution`` (an :class:`Attribution`, None before setup), a ``schedule`` and a ``method_class``."""

    attribution: Attribution | None

    def _results(self) -> Attribution:
        if self.attribution is None or self.attribution.grouping is None:
            s = self.schedule
            raise RuntimeError(f"no attribution pass has run: fit with the callback first (its schedule every_n_epochs="
                               f"{s.every_n_epochs}, every_n_steps={s.every_n_steps}, at_fit_end={s.at_fit_end} may "
                               "not have fired in a short fit: `at_fit_end=True` adds a pass at the end).")
        return self.attribution

    @property
    def self_influence(self) -> Tensor:
        """Self-influence (num_rows,): one per training example (dataset order), or per group with ``group_by``."""
        return self._results().self_influence()

    def scores(self, query: DataLoader | Dataset, normalize: Normalize | None = None, batch_size: int = 256,
               block: int = 4096) -> Tensor:
        """Scores (num_rows, n_query) of every row for every query example, in dataset order (see ``Attribution``)."""
        return self._results().scores(query, normalize, batch_size, block)

    def topk(self, query: DataLoader | Dataset, k: int = 10, normalize: Normalize | None = None, batch_size: int = 256,
             block: int = 4096) -> TopK:
        """Top-k proponents / opponents (train indices, or group ids) of every query, without the full matrix."""
        return self._results().topk(query, k, normalize, batch_size, block)

    @property
    def groups(self) -> Grouping:
        """The rows: ``groups.assignment`` (n_train,) maps each training example to its group (identity if ungrouped)."""
        return self._results().grouping

    @property
    def records(self) -> list[dict[str, Any]]:
        return [] if self.attribution is None else self.attribution.records

    @classmethod
    def load(cls, dirpath: str, module: torch.nn.Module, normalize: Normalize | None = None) -> Attribution:
        """The results a fit with this callback stored in ``dirpath`` (any process or world size), checked against
        their recorded checksums, ready for ``self_influence()``, ``scores(query)`` and ``topk(query, k)``."""
        return Attribution.load(dirpath, module, normalize, method=cls.method_class.name)
