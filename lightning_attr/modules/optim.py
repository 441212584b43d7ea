"""AdamW with linear warm-up and cosine decay over the trainer's estimated number of steps."""

from __future__ import annotations

import math
from typing import Iterable

import lightning as L
import torch

__all__ = ["adamw_cosine"]


def adamw_cosine(module: L.LightningModule, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                 warmup_fraction: float = 0.05) -> dict:
    """Optimizer + per-step scheduler config for ``configure_optimizers``."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    warmup = max(1, int(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
