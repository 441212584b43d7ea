"""Names of the grouped API before groups became rows; thin aliases kept for one release, with a warning."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_deprecation
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["GroupAliases"]


class GroupAliases:
    """``group_scores`` -> ``scores(query, normalize="sum")``; ``group_self_influence`` -> ``self_influence`` of the
    summed gradient; ``group_mean_self_influence`` -> ``self_influence`` (the mean gradient, the default)."""

    def group_scores(self, query: DataLoader | Dataset, batch_size: int = 256, block: int = 4096) -> Tensor:
        rank_zero_deprecation("`group_scores(query)` is deprecated: use `scores(query, normalize='sum')`.")
        return self.scores(query, "sum", batch_size, block)

    @property
    def group_self_influence(self) -> Tensor:
        rank_zero_deprecation("`group_self_influence` is deprecated: use `attribution.self_influence('sum')`.")
        return self._results().self_influence("sum")

    @property
    def group_mean_self_influence(self) -> Tensor:
        rank_zero_deprecation("`group_mean_self_influence` is deprecated: use `self_influence` (normalize='mean').")
        return self._results().self_influence("mean")
