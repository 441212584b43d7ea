"""The optimizers of the package's LightningModules: AdamW (the default) or SGD with momentum, each with linear
warm-up and cosine decay over the trainer's estimated number of steps (stepped every optimizer step)."""

from __future__ import annotations

import math
from typing import Iterable

import lightning as L
import torch

__all__ = ["OPTIMIZERS", "adamw_cosine", "check_optimizer", "cosine_schedule", "optimizer_cosine", "sgd_cosine"]

OPTIMIZERS = ("adamw", "sgd")


def check_optimizer(optimizer: str, momentum: float = 0.0) -> str:
    """``optimizer`` if it is one of :data:`OPTIMIZERS` and ``momentum`` is a number >= 0, else a ``ValueError``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer`={optimizer!r} is not one of {list(OPTIMIZERS)}: 'adamw' (torch.optim.AdamW, "
                         "the default) or 'sgd' (torch.optim.SGD with `momentum`, which unrolled differentiation "
                         "needs).")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"`momentum` must be a number in [0, 1) (SGD's momentum), got {momentum!r}.")
    return optimizer


def cosine_schedule(module: L.LightningModule, optimizer: torch.optim.Optimizer, warmup_fraction: float = 0.05
                    ) -> dict:
    """``configure_optimizers``'s return value: ``optimizer`` with a per-step ``LambdaLR`` that warms the learning
    rate up linearly over the first ``warmup_fraction`` of the trainer's estimated steps (at least one), then decays
    it along a half cosine to 0 at the last step."""
    total = max(1, int(module.trainer.estimated_stepping_batches))
    warmup = max(1, int(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adamw_cosine(module: L.LightningModule, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                 warmup_fraction: float = 0.05) -> dict:
    """``torch.optim.AdamW`` (decoupled weight decay) over the trainable ``params``, with :func:`cosine_schedule`."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)  # CPU too: one kernel per op
    return cosine_schedule(module, optimizer, warmup_fraction)


def sgd_cosine(module: L.LightningModule, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
               warmup_fraction: float = 0.05, momentum: float = 0.9) -> dict:
    """``torch.optim.SGD`` with ``momentum`` (weight decay added to the gradient, PyTorch's coupled L2 form) over the
    trainable ``params``, with :func:`cosine_schedule`."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return cosine_schedule(module, optimizer, warmup_fraction)


def optimizer_cosine(optimizer: str, module: L.LightningModule, params: Iterable[torch.nn.Parameter], lr: float,
                     weight_decay: float, warmup_fraction: float = 0.05, momentum: float = 0.9) -> dict:
    """:func:`adamw_cosine` (``optimizer="adamw"``, ``momentum`` unused) or :func:`sgd_cosine` (``"sgd"``)."""
    if check_optimizer(optimizer, momentum) == "sgd":
        return sgd_cosine(module, params, lr, weight_decay, warmup_fraction, momentum)
    return adamw_cosine(module, params, lr, weight_decay, warmup_fraction)
