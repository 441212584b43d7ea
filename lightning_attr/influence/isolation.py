"""Run attribution work without touching training: eval mode and every RNG state restored afterwards."""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

__all__ = ["isolated"]


@contextlib.contextmanager
def isolated(module: torch.nn.Module) -> Iterator[None]:
    """Run a block in eval mode and restore train/eval flags and the Python / NumPy / torch (CPU, CUDA) RNG states."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, flag in modes.items():
            m.training = flag
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
