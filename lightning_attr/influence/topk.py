"""Top-k proponents and opponents per query, computed over train blocks (never an n_train x n_query matrix)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["Ranked", "TopK", "topk_blockwise"]


class Ranked(NamedTuple):
    """``values`` and ``indices`` (rows: training examples, or groups), each (n_query, k), best first."""

    values: Tensor
    indices: Tensor


@dataclass(frozen=True)
class TopK:
    """The ``proponents`` (highest scores, descending) and ``opponents`` (lowest, ascending) of every query."""

    proponents: Ranked
    opponents: Ranked

    def __getitem__(self, name: str) -> Ranked:
        """``top["proponents"]``: dict-style access to the two fields."""
        if name not in ("proponents", "opponents"):
            raise KeyError(f"{name!r}: a TopK holds 'proponents' and 'opponents'.")
        return getattr(self, name)


def topk_blockwise(block_scores: Callable[[int, int], Tensor], n_train: int, k: int, block: int = 4096) -> TopK:
    """The top-k rows per query from ``block_scores(start, stop)``, the scores (stop - start, n_query) of rows
    ``start:stop``, one block at a time."""
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    k = min(k, n_train)
    best: dict[str, tuple[Tensor, Tensor] | None] = {"proponents": None, "opponents": None}
    for start in range(0, n_train, block):
        s = block_scores(start, min(n_train, start + block)).T.float()  # (m, b)
        idx = torch.arange(start, start + s.shape[1], device=s.device).expand_as(s)
        for name, largest in (("proponents", True), ("opponents", False)):
            vals, ids = (s, idx) if best[name] is None else (torch.cat([best[name][0], s], 1),
                                                               torch.cat([best[name][1], idx], 1))
            top = vals.topk(min(k, vals.shape[1]), dim=1, largest=largest, sorted=True)
            best[name] = (top.values, ids.gather(1, top.indices))
    return TopK(Ranked(*best["proponents"]), Ranked(*best["opponents"]))
