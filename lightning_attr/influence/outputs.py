"""Per-example output functions whose gradients attribution uses: the loss (TracIn) and the margin (TRAK)."""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OutputFn", "cross_entropy", "margin", "get_output_fn", "OUTPUTS", "check_logits"]

OutputFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy ``(B, K), (B,) -> (B,)``."""
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """TRAK's margin ``logit_y - logsumexp_{j != y} logit_j``: ``(B, K), (B,) -> (B,)``."""
    correct = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    hit = torch.arange(logits.shape[-1], device=logits.device) == y.unsqueeze(-1)  # vmap-safe one-hot
    others = logits.masked_fill(hit, float("-inf"))
    return correct - others.logsumexp(-1)


def mse(outputs: Tensor, y: Tensor) -> Tensor:
    """Per-example squared error summed over outputs: ``(B, K), (B, K) -> (B,)``."""
    return (outputs - y).pow(2).flatten(1).sum(1)


OUTPUTS = {"cross_entropy": cross_entropy, "margin": margin, "mse": mse}


def get_output_fn(output: Union[str, OutputFn]) -> OutputFn:
    """An output function by name (``cross_entropy``, ``margin``, ``mse``) or a callable returning (B,) values."""
    if callable(output):
        return output
    if output not in OUTPUTS:
        raise ValueError(f"`loss` / `output`={output!r} is not one of {sorted(OUTPUTS)} or a callable.")
    return OUTPUTS[output]


def check_logits(out: object, batch_size: int, owner: str) -> None:
    """Raise unless ``out`` (what ``owner``'s forward returned) is class logits (batch_size, K): data attribution
    differentiates a per-example loss or margin of them."""
    if isinstance(out, Tensor) and out.dim() == 2 and out.shape[0] == batch_size and out.is_floating_point():
        return
    what = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor)
            else f"a {type(out).__name__}" + (f" of {len(out)} items" if isinstance(out, (tuple, list, dict)) else ""))
    raise ValueError(f"data attribution needs {owner}(x) to return class logits of shape (B, K) = ({batch_size}, K); it "
                     f"returned {what}. Attribute a classifier, or wrap the module so that forward returns its logits.")
