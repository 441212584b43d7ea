"""Amortization heads: per-patch features (B, d, D) and the explained model's output (B, K) -> attributions (B, d, K)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TransformerHead", "MLPHead", "build_head"]


class TransformerHead(nn.Module):
    """A small pre-norm transformer over the patch tokens plus one token carrying the model's prediction.

    (B, d, D) patch features and (B, K) prediction -> (B, d, K). The output layer starts at zero, so training
    starts from the all-zero explanation.
    """

    def __init__(self, in_dim: int, num_players: int, num_classes: int, dim: int = 128, depth: int = 2,
                 heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim))
        self.pred = nn.Linear(num_classes, dim)
        self.pos = nn.Parameter(torch.zeros(1, num_players + 1, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor, prediction: Tensor) -> Tensor:
        tokens = torch.cat([self.pred(prediction).unsqueeze(1), self.proj(features)], 1) + self.pos
        return self.out(self.norm(self.blocks(tokens)[:, 1:]))


class MLPHead(nn.Module):
    """A per-patch MLP on [patch feature, prediction]: (B, d, D), (B, K) -> (B, d, K); zero-initialized output."""

    def __init__(self, in_dim: int, num_players: int, num_classes: int, dim: int = 128, depth: int = 2,
                 heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(in_dim + num_classes)]
        width = in_dim + num_classes
        for _ in range(depth):
            layers += [nn.Linear(width, dim), nn.GELU(), nn.Dropout(dropout)]
            width = dim
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_classes)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor, prediction: Tensor) -> Tensor:
        pred = prediction.unsqueeze(1).expand(-1, features.shape[1], -1)
        return self.out(self.body(torch.cat([features, pred], -1)))


HEADS = {"transformer": TransformerHead, "mlp": MLPHead}


def build_head(kind: str, **kwargs) -> nn.Module:
    """The head called ``kind`` ("transformer" or "mlp")."""
    if kind not in HEADS:
        raise ValueError(f"`head`={kind!r} is not a known head; allowed: {sorted(HEADS)}.")
    return HEADS[kind](**kwargs)
