"""Seeded random projections that never hold more of the matrix than a memory cap allows.

Entries are drawn block by block on the CPU from a generator seeded by ``(seed, *key, block)``, then moved to the
input's device, so a projection is the same on CPU and CUDA and can be regenerated at any time (train and query
features of one checkpoint share it). Scaled so that ``E[<Px, Py>] = <x, y>``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["mix_seed", "RandomProjector", "KroneckerProjector", "CountSketch", "PROJECTION_TYPES"]

PROJECTION_TYPES = ("rademacher", "gaussian")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (``numpy.random.SeedSequence``; stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32).astype(
        np.uint64).dot(np.array([1, 2**32], dtype=np.uint64)) & np.uint64(2**63 - 1))


class RandomProjector:
    """``x (B, in_dim) -> x @ P (B, out_dim)`` with ``P`` i.i.d. Rademacher or Gaussian, scaled by ``1/sqrt(out_dim)``.

    ``P`` is generated in row blocks of at most ``block_mb`` MiB; when the whole matrix is at most ``cache_mb`` it
    is kept after the first call (per device), otherwise blocks are regenerated on every call.
    """

    GROUP = 256  # rows drawn from one seeded generator; the matrix does not depend on the memory block size

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, kind: str = "rademacher", key: tuple[int, ...] = (),
                 block_mb: float = 64.0, cache_mb: float = 256.0) -> None:
        if kind not in PROJECTION_TYPES:
            raise ValueError(f"`proj_type` must be one of {PROJECTION_TYPES}, got {kind!r}.")
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"projection sizes must be >= 1, got in_dim={in_dim}, out_dim={out_dim}.")
        self.in_dim, self.out_dim, self.seed, self.kind, self.key = in_dim, out_dim, seed, kind, tuple(key)
        groups = max(1, int(block_mb * 2**20 / 4 / out_dim) // self.GROUP)
        self.rows = min(in_dim, groups * self.GROUP)
        self.cacheable = in_dim * out_dim * 4 <= cache_mb * 2**20
        self._cache: dict[torch.device, Tensor] = {}

    def _group(self, j: int) -> Tensor:
        n = min(self.GROUP, self.in_dim - j * self.GROUP)
        g = torch.Generator().manual_seed(mix_seed(self.seed, *self.key, j))
        if self.kind == "rademacher":
            return torch.randint(0, 2, (n, self.out_dim), generator=g).float().mul_(2).sub_(1)
        return torch.randn(n, self.out_dim, generator=g)

    def block(self, i: int, device: torch.device | str = "cpu") -> Tensor:
        """Rows ``[i * rows, (i + 1) * rows)`` of the scaled matrix, (rows, out_dim) float32."""
        start, stop = i * self.rows, min(self.in_dim, (i + 1) * self.rows)
        m = torch.cat([self._group(j) for j in range(start // self.GROUP, -(-stop // self.GROUP))])
        return m.mul_(1.0 / math.sqrt(self.out_dim)).to(device)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.in_dim / self.rows)

    def matrix(self, device: torch.device | str = "cpu") -> Tensor:
        """The whole scaled matrix (in_dim, out_dim); for tests and small projections."""
        return torch.cat([self.block(i, device) for i in range(self.num_blocks)])

    def cached(self, device: torch.device | str) -> Tensor:
        """The whole matrix on ``device``, generated once (only for matrices within ``cache_mb``)."""
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = self.matrix(device)
        return self._cache[device]

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects inputs with last dimension {self.in_dim}, got {tuple(x.shape)}.")
        x = x.float()
        if self.cacheable:
            return x @ self.cached(x.device)
        out = x.new_zeros(*x.shape[:-1], self.out_dim)
        for i in range(self.num_blocks):
            out += x[..., i * self.rows : (i + 1) * self.rows] @ self.block(i, x.device)
        return out


class KroneckerProjector:
    """Projection of a layer's per-example gradient ``sum_s g_s a_s^T`` (O x I) by ``P_out (x) P_in`` (LoGra).

    ``project(a (B, S, I), g (B, S, O)) -> (B, k_out * k_in)`` projects inputs and output gradients separately and
    never forms the O x I per-example gradient. ``E[P P^T] = I`` for each factor, so inner products stay unbiased.
    """

    def __init__(self, in_dim: int, out_dim: int, k_in: int, k_out: int, seed: int = 0, kind: str = "rademacher",
                 key: tuple[int, ...] = ()) -> None:
        self.p_in = RandomProjector(in_dim, k_in, seed, kind, key + (0,), cache_mb=float("inf"))
        self.p_out = RandomProjector(out_dim, k_out, seed, kind, key + (1,), cache_mb=float("inf"))
        self.out_dim_total = k_in * k_out

    @staticmethod
    def split(budget: int, in_dim: int, out_dim: int) -> tuple[int, int]:
        """Factor a budget ``k`` into ``(k_in, k_out)`` with ``k_in / k_out ~ in_dim / out_dim``."""
        k_in = int(min(in_dim, max(1, round(math.sqrt(budget * in_dim / out_dim)))))
        k_out = int(min(out_dim, max(1, round(budget / k_in))))
        return k_in, k_out

    def __call__(self, a: Tensor, g: Tensor, bounds: Tensor | None = None) -> Tensor:
        """(B, k_out * k_in) per example, or (R, k_out * k_in) per segment of ``bounds`` (see ``grads.contract``)."""
        from lightning_attr.influence.grads import contract

        return contract(self.p_in(a), self.p_out(g), bounds).flatten(1)

    def matrix(self) -> Tensor:
        """The dense equivalent (out_dim * in_dim, k_out * k_in) acting on row-major flattened O x I gradients."""
        return torch.kron(self.p_out.matrix(), self.p_in.matrix())


class CountSketch:
    """``x (B, in_dim) -> (B, out_dim)``: coordinate ``i`` is added with sign ``s_i`` to bucket ``h_i`` (seeded).

    ``E[<Sx, Sy>] = <x, y>`` with the same variance as a dense Rademacher projection of that size
    (``(|x|^2 |y|^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / out_dim``) at O(in_dim) cost per row instead of
    O(in_dim * out_dim). Hashes are drawn on the CPU in groups of 256 coordinates, so they do not depend on the device.
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int = 0, key: tuple[int, ...] = ()) -> None:
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"projection sizes must be >= 1, got in_dim={in_dim}, out_dim={out_dim}.")
        self.in_dim, self.out_dim = in_dim, out_dim
        buckets, signs = [], []
        for j in range(math.ceil(in_dim / RandomProjector.GROUP)):
            n = min(RandomProjector.GROUP, in_dim - j * RandomProjector.GROUP)
            g = torch.Generator().manual_seed(mix_seed(seed, *key, j))
            buckets.append(torch.randint(0, out_dim, (n,), generator=g))
            signs.append(torch.randint(0, 2, (n,), generator=g).float().mul_(2).sub_(1))
        self.buckets, self.signs = torch.cat(buckets), torch.cat(signs)

    def matrix(self) -> Tensor:
        """The dense equivalent (in_dim, out_dim); for tests."""
        return torch.zeros(self.in_dim, self.out_dim).index_put_((torch.arange(self.in_dim), self.buckets), self.signs)

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"sketch expects inputs with last dimension {self.in_dim}, got {tuple(x.shape)}.")
        if self.buckets.device != x.device:
            self.buckets, self.signs = self.buckets.to(x.device), self.signs.to(x.device)
        x = x.float().reshape(-1, self.in_dim)
        return x.new_zeros(x.shape[0], self.out_dim).index_add_(1, self.buckets, x * self.signs)
