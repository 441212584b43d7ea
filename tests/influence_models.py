"""Tiny models for the influence tests (importable by several test modules)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn(num_classes: int = 3, seed: int = 0) -> nn.Module:
    """Conv (bias) + BatchNorm + Conv (no bias) + LayerNorm + Linear on (B, 1, 6, 6) inputs."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.ReLU(), nn.Flatten(), nn.LayerNorm(16),
        nn.Linear(16, num_classes),
    )
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_mlp(d_in: int = 5, hidden: int = 4, num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)).eval()


def brute_force_grads(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, output_fn) -> torch.Tensor:
    """(B, D): one ``torch.autograd.grad`` per example, flattened in ``names`` order."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        value = output_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(value, [params[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)
