"""Logging of top-k proponents / opponents: a JSON file always, a W&B table with images under a WandbLogger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from lightning_attr.io import atomic_write

__all__ = ["log_topk", "to_image"]


def to_image(x: Tensor) -> np.ndarray | None:
    """A (C, H, W) or (H, W) tensor as an (H, W, C) uint8 array, min-max scaled; None for non-image inputs."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        return None
    x = x.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def log_topk(trainer: L.Trainer, top: dict[str, tuple[Tensor, Tensor]], queries: tuple[Tensor, Tensor, Tensor],
             dataset: Any, keys: dict[str, str], key: str, json_path: str) -> None:
    """Write ``top`` (``{"proponents" | "opponents": (values, indices) (m, k)}``) for the query examples to
    ``json_path`` and, for each ``WandbLogger``, log a table with one row per (query, rank). ``dataset`` None: the
    indices are group ids and the table shows no training images."""
    qx, qy, qi = queries
    rows = []
    for j in range(qx.shape[0]):
        for r in range(top["proponents"][0].shape[1]):
            rows.append(dict(query=int(qi[j]), query_label=int(qy[j]), rank=r + 1,
                             proponent=int(top["proponents"][1][j, r]), proponent_score=float(top["proponents"][0][j, r]),
                             opponent=int(top["opponents"][1][j, r]), opponent_score=float(top["opponents"][0][j, r])))
    text = json.dumps(rows, indent=1)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
    wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
    if not wandb_loggers:
        return
    import wandb

    def item(i: int) -> tuple[Any, int]:
        if dataset is None:  # grouped attribution: rows are groups, not images
            return None, -1
        ex = dataset[i]
        x, y = (ex[keys["input_key"]], ex[keys["label_key"]]) if isinstance(ex, dict) else (ex[0], ex[1])
        img = to_image(torch.as_tensor(x))
        return (wandb.Image(img) if img is not None else None), int(y)

    columns = ["query", "query_label", "rank", "proponent", "proponent_label", "proponent_index", "proponent_score",
               "opponent", "opponent_label", "opponent_index", "opponent_score"]
    data = []
    for row in rows:
        j = int((qi == row["query"]).nonzero()[0, 0])
        q_img = to_image(qx[j])
        p_img, p_lab = item(row["proponent"])
        o_img, o_lab = item(row["opponent"])
        data.append([wandb.Image(q_img) if q_img is not None else None, row["query_label"], row["rank"],
                     p_img, p_lab, row["proponent"], row["proponent_score"],
                     o_img, o_lab, row["opponent"], row["opponent_score"]])
    for lg in wandb_loggers:
        lg.log_table(key=key, columns=columns, data=data, step=trainer.global_step)
