"""The optimizer hyperparameters unrolled differentiation follows, read from a ``torch.optim.SGD``.

Only SGD is differentiated (``lr``, ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``; ``maximize=False``),
with exactly PyTorch's update: ``g = grad + weight_decay * theta``; with momentum ``b_1 = g_1`` (no dampening on the
first step) and ``b_{t+1} = momentum * b_t + (1 - dampening) * g_{t+1}``; the step is ``-lr * (g + momentum * b)``
(nesterov) or ``-lr * b``. Other optimizers (Adam, AdamW, RMSprop, ...) are refused, never approximated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SGDHyperparameters", "hyperparameters_by_name", "momentum_buffers_by_name", "sgd_hyperparameters",
           "sgd_step"]

SUPPORTED = ("torch.optim.SGD with lr, momentum, dampening, nesterov, weight_decay and maximize=False; Adam / AdamW / "
             "RMSprop and other adaptive optimizers are not differentiated: train with SGD to use unrolled "
             "differentiation")


@dataclass(frozen=True)
class SGDHyperparameters:
    """One parameter group's SGD settings at one step (the learning rate may change between steps)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(f"`nesterov`=True needs `momentum` > 0 and `dampening` = 0 (as torch.optim.SGD), got "
                             f"momentum={self.momentum}, dampening={self.dampening}.")


def sgd_hyperparameters(optimizer: torch.optim.Optimizer) -> list[SGDHyperparameters]:
    """The current settings of each of ``optimizer``'s param groups; a ``ValueError`` for anything but
    ``torch.optim.SGD`` with ``maximize=False`` (pass the torch optimizer, not Lightning's wrapper)."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"`optimizer` is {type(optimizer).__name__}; unrolled differentiation supports {SUPPORTED}.")
    out = []
    for i, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise ValueError(f"param group {i} of `optimizer` has maximize=True; supported: {SUPPORTED}.")
        out.append(SGDHyperparameters(lr=float(group["lr"]), momentum=float(group.get("momentum", 0.0)),
                                      dampening=float(group.get("dampening", 0.0)),
                                      nesterov=bool(group.get("nesterov", False)),
                                      weight_decay=float(group.get("weight_decay", 0.0))))
    return out


def hyperparameters_by_name(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]
                            ) -> dict[str, SGDHyperparameters]:
    """``{name: settings of the param group holding params[name]}`` (matched by identity, so pass the module's own
    parameters, e.g. ``dict(model.named_parameters())`` restricted to the trained ones)."""
    groups = sgd_hyperparameters(optimizer)
    owner = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in owner]
    if missing:
        raise ValueError(f"`params` {missing[:5]} are in no param group of `optimizer`: they are not trained; pass "
                         "only the parameters the optimizer updates.")
    return {name: groups[owner[id(p)]] for name, p in params.items()}


def momentum_buffers_by_name(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: detached copy of optimizer.state[params[name]]["momentum_buffer"]}`` for the parameters that have one
    (none before the first momentum step); matched by identity like :func:`hyperparameters_by_name`."""
    out = {}
    for name, p in params.items():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf.detach().clone()
    return out


def sgd_step(params: Mapping[str, Tensor], momentum_buffers: Mapping[str, Tensor], grads: Mapping[str, Tensor],
             hyper: Mapping[str, SGDHyperparameters]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One torch.optim.SGD step as a function (same operations in the same order, new tensors, inputs untouched):
    ``(theta_t, buffers before step t, gradients at theta_t, settings per name) -> (theta_{t+1}, buffers after)``.
    A parameter without a buffer starts one with the step's (weight-decayed) gradient when its momentum is > 0;
    with momentum 0 its buffer, if any, is left as it is (as PyTorch does)."""
    new_params, buffers = {}, dict(momentum_buffers)
    for name, h in hyper.items():
        d = grads[name].add(params[name], alpha=h.weight_decay) if h.weight_decay else grads[name]
        if h.momentum:
            if name in buffers:
                buf = buffers[name].mul(h.momentum).add(d, alpha=1 - h.dampening)
            else:
                buf = d.clone()
            buffers[name] = buf
            d = d.add(buf, alpha=h.momentum) if h.nesterov else buf
        new_params[name] = params[name].add(d, alpha=-h.lr)
    return new_params, buffers
