"""Logging of what attribution found: the self-influence summary, noisy-label detection when the corrupted labels are
known, and the top-k proponents / opponents of a few tracked queries (a JSON file; a W&B table with images)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from lightning_attr.callbacks.context import datamodule_attr, split
from lightning_attr.data.indexed import unpack_batch
from lightning_attr.influence.attribution import Attribution
from lightning_attr.influence.reporting import noisy_label_metrics, noisy_mask, topk_rows
from lightning_attr.influence.topk import topk_blockwise
from lightning_attr.io import save_json

__all__ = ["Reporter", "to_image"]

TABLE_COLUMNS = ["query", "query_label", "rank", "proponent", "proponent_label", "proponent_index", "proponent_score",
                 "opponent", "opponent_label", "opponent_index", "opponent_score"]


def to_image(x: Tensor) -> np.ndarray | None:
    """A (C, H, W) or (H, W) tensor as an (H, W, C) uint8 array, min-max scaled; None for non-image inputs."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        return None
    x = x.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class Reporter:
    """See the module docstring. ``query_data`` (default: the validation split) / ``num_queries`` / ``top_k``: the
    tracked queries; ``noisy_labels``: a bool mask, an index list, or the name of a datamodule attribute."""

    def __init__(self, query_data: Dataset | None, num_queries: int, top_k: int,
                 noisy_labels: str | Sequence[int] | Tensor | None, keys: dict[str, str]) -> None:
        if num_queries < 0 or top_k < 1:
            raise ValueError(f"`num_queries` must be >= 0 and `top_k` >= 1, got {num_queries} and {top_k}.")
        self.query_data, self.num_queries, self.top_k, self.noisy_labels = query_data, num_queries, top_k, noisy_labels
        self.keys = keys
        self._queries: tuple[Tensor, Tensor, Tensor] | None = None

    def queries(self, trainer: L.Trainer) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(x, y, index)`` of the tracked queries (the first ``num_queries`` query examples), or None."""
        if self._queries is not None or not self.num_queries:
            return self._queries
        data = self.query_data if self.query_data is not None else split(trainer.datamodule, "val")[0]
        if data is None or len(data) == 0:
            return None
        self._queries = unpack_batch(default_collate([data[i] for i in range(min(self.num_queries, len(data)))]),
                                     **self.keys)
        return self._queries

    def noisy(self, trainer: L.Trainer, n: int) -> Tensor | None:
        spec = self.noisy_labels
        if isinstance(spec, str):
            value, _ = datamodule_attr(trainer.datamodule, spec)
            if value is None:
                raise ValueError(f"`noisy_labels`={spec!r} is not an attribute of the datamodule "
                                 f"{type(trainer.datamodule).__name__}; pass a mask / list of indices or the "
                                 "attribute's name.")
            spec = value
        return None if spec is None else noisy_mask(spec, n)

    def report(self, trainer: L.Trainer, attribution: Attribution, prefix: str, name: str, dataset: Any
               ) -> dict[str, float]:
        """Log the metrics of ``attribution`` now (rank zero) and write ``topk-{name}.json``; returns the metrics.
        ``dataset``: the training set, for images in the W&B table (None for groups)."""
        metrics = {f"{prefix}/checkpoints": float(attribution.num_checkpoints)} if attribution.num_checkpoints else {}
        s = attribution.self_influence() if attribution.method.has_self_influence else None
        if s is not None:
            metrics.update({f"{prefix}/self_influence_mean": float(s.mean()), f"{prefix}/self_influence_max": float(s.max())})
        noisy = self.noisy(trainer, attribution.n_train)
        if noisy is not None and s is not None:
            found = noisy_label_metrics(s, attribution.grouping, noisy)
            metrics.update({f"{prefix}/{k}": v for k, v in found.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        queries = self.queries(trainer)
        if attribution.tracked is not None and queries is not None:
            scores = attribution.tracked_scores()
            top = topk_blockwise(lambda a, b: scores[a:b], attribution.num_rows, self.top_k)
            rows = topk_rows(top, queries)
            save_json(rows, os.path.join(attribution.store.directory, f"topk-{name}.json"))
            self._table(trainer, rows, queries, dataset, f"{prefix}/top_k")
        return metrics

    def _table(self, trainer: L.Trainer, rows: list[dict], queries: tuple[Tensor, Tensor, Tensor], dataset: Any,
               key: str) -> None:
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not loggers:
            return
        import wandb

        def image(x: Tensor) -> Any:
            img = to_image(torch.as_tensor(x))
            return wandb.Image(img) if img is not None else None

        def item(i: int) -> tuple[Any, int]:
            if dataset is None:  # grouped attribution: rows are groups, not images
                return None, -1
            ex = dataset[i]
            x, y = (ex[self.keys["input_key"]], ex[self.keys["label_key"]]) if isinstance(ex, dict) else (ex[0], ex[1])
            return image(x), int(y)

        qx, _, qi = queries
        data = []
        for row in rows:
            j = int((qi == row["query"]).nonzero()[0, 0])
            (p_img, p_lab), (o_img, o_lab) = item(row["proponent"]), item(row["opponent"])
            data.append([image(qx[j]), row["query_label"], row["rank"], p_img, p_lab, row["proponent"],
                         row["proponent_score"], o_img, o_lab, row["opponent"], row["opponent_score"]])
        for lg in loggers:
            lg.log_table(key=key, columns=TABLE_COLUMNS, data=data, step=trainer.global_step)
