"""K-FAC and EK-FAC curvature of Linear / Conv2d layers (Martens & Grosse 2015; Grosse & Martens 2016 for
convolutions; George et al. 2018 for the eigenvalue correction).

Per layer, with ``a`` the layer's input at each output position (convolutions: the unfolded patch; a column of ones
appended when the bias is selected) and ``g`` the gradient of the per-example loss w.r.t. the layer's output there:

- ``A = E_n[(1/T) sum_s a_s a_s^T]`` (I', I') and ``S = E_n[sum_s g_s g_s^T]`` (O, O), so that ``A (x) S`` approximates
  the Fisher ``E_n[vec(G_n) vec(G_n)^T]`` of the per-example gradient ``G_n = sum_s g_s a_s^T`` (O, I'); exact in
  expectation for one position when ``a`` and ``g`` are independent (K-FAC's assumption).
- Eigenbases ``A = Q_A diag(l_A) Q_A^T``, ``S = Q_S diag(l_S) Q_S^T`` in float64. K-FAC's eigenvalues are
  ``l_S l_A^T`` (O, I'); EK-FAC replaces them by ``Lambda = E_n[(Q_S^T G_n Q_A)^2]``, the exact second moment of the
  gradients in that basis.
- The damped inverse applied to ``V`` (m, O, I'): ``Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T``.

``g`` comes from labels sampled from the model (true Fisher, the Gauss-Newton matrix of softmax cross-entropy) or
from the data's labels (empirical Fisher). Sums over examples are accumulated here; the engine divides by the count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attr.influence.grads import contract

__all__ = ["factor_sums", "eigenbasis", "rotated_sq_sums", "kfac_eigenvalues", "precondition", "inverse_quadratic"]


def factor_sums(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-batch sums of the factors: ``sum_n (1/T) sum_s a a^T`` (I', I') and ``sum_n sum_s g g^T`` (O, O), float64,
    from ``a`` (B, T, I') and ``g`` (B, T, O)."""
    a, g = a.double(), g.double()
    return torch.einsum("bsi,bsj->ij", a, a) / a.shape[1], torch.einsum("bso,bsp->op", g, g)


def eigenbasis(factor: Tensor) -> tuple[Tensor, Tensor]:
    """``(eigenvalues (d,), eigenvectors (d, d))`` of a symmetric factor in float64; tiny negative eigenvalues from
    round-off are clipped to 0. LAPACK's divide-and-conquer ``eigh`` can fail to converge on factors with many
    repeated eigenvalues (dead units, constant inputs); the SVD of the PSD factor then gives the same decomposition."""
    factor = factor.double()
    factor = (factor + factor.T) / 2
    try:
        values, vectors = torch.linalg.eigh(factor)
    except torch.linalg.LinAlgError:
        vectors, values, _ = torch.linalg.svd(factor)
    return values.clamp(min=0.0), vectors


def _cast(q: Tensor, dtype: torch.dtype) -> Tensor:
    """``q`` in ``dtype`` with entries below its smallest normal number set to 0 (denormals slow matmuls down)."""
    if dtype == q.dtype:
        return q
    return torch.where(q.abs() < torch.finfo(dtype).tiny, torch.zeros_like(q), q).to(dtype)


def rotated_sq_sums(calls: list[tuple[Tensor, Tensor]], q_a: Tensor, q_s: Tensor) -> Tensor:
    """``sum_n (Q_S^T G_n Q_A)^2`` (O, I') of the per-example gradients ``G_n = sum_calls sum_s g_s a_s^T``, from the
    layer's factors ``[(a (B, T, I'), g (B, T, O))]`` per call. With few positions (a Linear layer: one per example)
    the factors are rotated first, ``T (O^2 + I'^2)`` per example instead of ``O I' (O + I')``; else ``G_n`` is formed."""
    dtype = calls[0][0].dtype
    qa, qs = _cast(q_a, dtype), _cast(q_s, dtype)
    o, i, positions = qs.shape[0], qa.shape[0], sum(a.shape[1] for a, _ in calls)
    if positions * (o * o + i * i + o * i) < positions * o * i + o * i * (o + i):
        rotated = sum(contract(a @ qa, g @ qs) for a, g in calls)
    else:
        rotated = qs.T @ sum(contract(a, g) for a, g in calls) @ qa
    return rotated.double().pow(2).sum(0)


def kfac_eigenvalues(l_a: Tensor, l_s: Tensor) -> Tensor:
    """K-FAC's eigenvalues ``l_S l_A^T`` (O, I') of ``A (x) S`` in the eigenbasis."""
    return l_s.unsqueeze(1) * l_a.unsqueeze(0)


def _damped(eigenvalues: Tensor, damping: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(eigenvalues + damping, mask of the positive ones)`` in ``dtype``; zero denominators clamped to stay finite."""
    denominator = (eigenvalues + damping).to(dtype)
    return denominator.clamp_min(torch.finfo(dtype).tiny), denominator > 0


def precondition(v: Tensor, q_a: Tensor, q_s: Tensor, eigenvalues: Tensor, damping: float,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """``Q_S [(Q_S^T V Q_A) / (eigenvalues + damping)] Q_A^T`` for ``v`` (m, O, I'), returned in ``v``'s dtype, with
    the math in ``dtype``. Directions without curvature or damping (a zero denominator) get 0 (the pseudo-inverse)."""
    q_a, q_s = _cast(q_a, dtype), _cast(q_s, dtype)
    rotated = q_s.T @ v.to(dtype) @ q_a
    denominator, positive = _damped(eigenvalues, damping, dtype)
    scaled = torch.where(positive, rotated / denominator, torch.zeros_like(rotated))
    return (q_s @ scaled @ q_a.T).to(v.dtype)


def inverse_quadratic(v: Tensor, q_a: Tensor, q_s: Tensor, eigenvalues: Tensor, damping: float,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """``vec(V)^T (damped inverse) vec(V)`` (m,) float64 for ``v`` (m, O, I'): ``sum (Q_S^T V Q_A)^2 / (eigenvalues +
    damping)``, half the work of :func:`precondition` (no rotation back); zero denominators contribute 0."""
    rotated = _cast(q_s, dtype).T @ v.to(dtype) @ _cast(q_a, dtype)
    denominator, positive = _damped(eigenvalues, damping, dtype)
    terms = torch.where(positive, rotated.double().pow(2) / denominator.double(), torch.zeros_like(rotated.double()))
    return terms.flatten(1).sum(1)
