"""Top-k proponents and opponents per query, computed over train blocks (never an n_train x n_query matrix)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["topk_blockwise"]


def topk_blockwise(block_scores: Callable[[int, int], Tensor], n_train: int, k: int, block: int = 4096
                   ) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"proponents": (values, indices), "opponents": (values, indices)}``, each (n_query, k).

    ``block_scores(start, stop)`` returns the scores (stop - start, n_query) of train rows ``start:stop``.
    Proponents are the k highest scores per query (descending), opponents the k lowest (ascending).
    """
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
    return best  # type: ignore[return-value]
