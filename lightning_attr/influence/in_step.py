"""Original TracIn from the training steps themselves (Pruthi et al., 2020, before the checkpoint approximation).

``self_influence(z) = sum_t eta_t ||grad l(theta_t, z)||^2`` and ``score(z, z') = sum_t eta_t <grad l(theta_t, z),
grad l(theta_t, z')>`` over the optimizer steps ``t`` whose batch held ``z``, at the weights before the step. The
per-example gradients come from the forward and backward training already runs: :class:`StepTaps` keeps each selected
layer's input and output gradient (a forward hook and a tensor hook that only read), and the featurizer turns them
into exact squared norms (from Gram matrices where cheaper: no per-example gradient is formed) and, for scores,
features against the tracked queries' gradients at the same weights.

The captured output gradients are those of the loss training differentiates: ``scale`` maps them to per-example
gradients of ``l`` (times the batch size for a mean-reduced loss, times the gradient accumulation Lightning divides
by, divided by an AMP loss scale).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.scores import Features, inner

__all__ = ["StepTaps", "step_contributions"]


class StepTaps:
    """Keeps ``(input, output gradient)`` of every call of the featurizer's layers while ``armed``."""

    def __init__(self, featurizer: GradientFeaturizer) -> None:
        if featurizer.layers is None or not all(layer.factored for layer in featurizer.layers):
            raise ValueError("in-step TracIn needs the selected parameters to be those of Linear / Conv2d layers; "
                             "choose them with `last_layer=True`, `module_types=['Linear', 'Conv2d']` or `parameters=`.")
        self.layers = featurizer.layers
        self.armed = False
        self.calls: dict[str, list[list[Any]]] = {layer.name: [] for layer in self.layers}
        self.handles: list = []

    def attach(self) -> None:
        self.detach()
        self.handles = [layer.module.register_forward_hook(self._hook(layer.name)) for layer in self.layers]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name: str):
        def forward_hook(module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
            if not self.armed or not output.requires_grad:
                return
            slot = [inputs[0].detach(), None]
            self.calls[name].append(slot)

            def keep(grad: Tensor) -> None:
                slot[1] = grad.detach()

            output.register_hook(keep)

        return forward_hook

    def take(self, scale: Tensor) -> bool:
        """Move the kept calls into the layers' ``calls`` with output gradients times ``scale`` (B,); False when the
        step recorded nothing (e.g. no backward ran)."""
        complete = all(slot[1] is not None for calls in self.calls.values() for slot in calls)
        found = any(self.calls.values())
        for layer in self.layers:
            layer.calls = [(a, g * scale.to(g).view(-1, *[1] * (g.dim() - 1))) for a, g in self.calls[layer.name]
                           if g is not None] if complete else []
            self.calls[layer.name] = []
        return complete and found

    def clear(self) -> None:
        for layer in self.layers:
            layer.calls = []
        self.calls = {layer.name: [] for layer in self.layers}


def step_contributions(featurizer: GradientFeaturizer, b: int, query: Features | None = None,
                       key: tuple[int, ...] = (0,)) -> tuple[Tensor, Tensor | None]:
    """From the taps in the featurizer's layers (per-example gradients times ``sqrt(eta)``): squared norms (b,) and,
    with ``query`` features of the same form, inner products (b, m)."""
    sq = featurizer.sq_norms_of_taps(b)
    if query is None:
        return sq, None
    train = featurizer.factors_of_taps() if featurizer.last_layer else featurizer.features_of_taps(b, key)
    return sq, inner(train, query)
