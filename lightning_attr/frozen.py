"""Frozen modules inside a trainable one: evaluate them in eval mode without leaving them in eval mode."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``module`` and all its submodules in eval mode (BatchNorm uses and keeps its running
    statistics, dropout is off), then restore every submodule's own train/eval flag.

    A frozen part of a LightningModule thus follows its owner's mode (Lightning finds no module in eval mode at the
    start of training) while its outputs are always the eval-mode ones.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in modes:
            m.training = flag
