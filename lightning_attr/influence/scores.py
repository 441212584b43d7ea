"""Primitives the attribution methods share: gradient inner products, TRAK's damped kernel, TRAK's ``Q``.

Features of one checkpoint are either flat ``(n, k)`` or factored ``(a (n, I), g (n, O))`` (exact last layer, whose
per-example gradient is ``g a^T``, so ``<G_i, G'_j> = (a_i . a'_j)(g_i . g'_j)``). A flat row may also be a whole
``O x I`` gradient flattened row-major (a group's last-layer gradient), which pairs with factored queries.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

__all__ = ["Features", "inner", "self_inner", "xtx", "damped_inverse", "trak_kernel", "out_to_loss"]

Features = Union[Tensor, tuple[Tensor, Tensor]]


def inner(train: Features, query: Features) -> Tensor:
    """Gradient inner products (n, m) between two feature sets of one checkpoint."""
    if isinstance(train, Tensor) and not isinstance(query, Tensor):  # flat O x I rows against factored queries
        a, g = query
        return train.float() @ torch.einsum("mo,mi->moi", g.float(), a.float()).flatten(1).T
    if isinstance(train, Tensor):
        return train.float() @ query.float().T
    (a, g), (a2, g2) = train, query
    return (a.float() @ a2.float().T) * (g.float() @ g2.float().T)


def self_inner(feats: Features) -> Tensor:
    """Squared gradient norms (n,) of one checkpoint's features."""
    if isinstance(feats, Tensor):
        return feats.float().pow(2).sum(1)
    a, g = feats
    return a.float().pow(2).sum(1) * g.float().pow(2).sum(1)


def xtx(x: Tensor, block: int = 8192) -> Tensor:
    """``X^T X`` (k, k) in fp32, accumulated over row blocks of ``x`` (n, k)."""
    out = x.new_zeros(x.shape[1], x.shape[1], dtype=torch.float32)
    for i in range(0, x.shape[0], block):
        xb = x[i : i + block].float()
        out += xb.T @ xb
    return out


def damped_inverse(gram: Tensor, damping: float = 1e-3) -> Tensor:
    """``(X^T X + lambda I)^-1`` (k, k) fp32 with ``lambda = damping * mean(diag(X^T X))`` (Cholesky in float64;
    pivots below 1e-3 of the largest, i.e. beyond fp32 accuracy, count as singular)."""
    if damping < 0:
        raise ValueError(f"`damping` must be >= 0, got {damping}.")
    g = gram.double()
    lam = damping * float(g.diagonal().mean())
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g + lam * eye)
    pivots = chol.diagonal()
    if int(info) != 0 or float(pivots.min()) ** 2 < 1e-6 * float(pivots.max()) ** 2:
        raise ValueError(f"X^T X + lambda I is singular (lambda={lam:.3g}); increase `damping` (now {damping}), "
                         "e.g. when the projection size exceeds the number of training examples.")
    return torch.cholesky_inverse(chol).float()


def trak_kernel(x: Tensor, inverse: Tensor, block: int = 8192) -> Tensor:
    """TRAK train features ``X (X^T X + lambda I)^-1`` (n, k), row block by row block."""
    return torch.cat([x[i : i + block].float() @ inverse for i in range(0, x.shape[0], block)])


def out_to_loss(logits: Tensor, y: Tensor) -> Tensor:
    """TRAK's ``Q = 1 - p_y`` (B,) from logits (B, K) and labels (B,)."""
    return 1.0 - logits.float().softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
