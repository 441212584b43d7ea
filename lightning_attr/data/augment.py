"""A large virtual training set without a hub: distinct random affine + elastic variants of a base image set.

``AugmentedDataset(base, size)`` serves ``size`` items with stable indices: the first ``len(base)`` are the base items
themselves, item ``i`` beyond them is ``base[i % len(base)]`` under a random affine + elastic transform drawn from a
generator seeded by ``(seed, i)`` alone. Items are therefore reproducible bitwise across processes, workers and runs,
and per-example results (oracle labels, attribution scores) can be keyed by the virtual index.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_attr.data.images import ImageDataModule, _class_count, dataset_fingerprint

__all__ = ["AugmentedDataset", "AugmentedImageDataModule", "random_affine_elastic"]

_ALGORITHM = "affine_elastic-v1"  # bump when the transform changes: it keys label caches through `fingerprint`


@functools.lru_cache(maxsize=32)
def _gaussian_kernel(sigma: float) -> Tensor:
    """1-D Gaussian of std ``sigma`` pixels, radius ``ceil(3 sigma)``, scaled to unit L2 norm: (2r + 1,) float64.

    Unit L2 norm makes white unit-variance noise smoothed by the separable 2-D kernel keep unit variance."""
    radius = math.ceil(3.0 * sigma)
    if radius == 0:
        return torch.ones(1, dtype=torch.float64)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.norm()


@functools.lru_cache(maxsize=64)
def _smoothing_matrix(length: int, sigma: float, dtype: torch.dtype) -> Tensor:
    """Banded (Toeplitz) matrix of the valid convolution with :func:`_gaussian_kernel`: (length, length + 2r).

    Row ``j`` holds the kernel at columns ``j .. j + 2r``; one small matmul per axis smooths a padded noise field
    several times faster than ``conv1d`` at these sizes."""
    kernel = _gaussian_kernel(sigma)
    k = kernel.numel()
    matrix = torch.zeros(length, length + k - 1, dtype=torch.float64)
    for j in range(length):
        matrix[j, j : j + k] = kernel
    return matrix.to(dtype)


@functools.lru_cache(maxsize=32)
def _identity_grid(height: int, width: int, dtype: torch.dtype) -> Tensor:
    """The identity's sampling grid in ``grid_sample``'s normalized coordinates (``align_corners=False``): (H, W, 2)."""
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=dtype)
    return F.affine_grid(theta, [1, 1, height, width], align_corners=False)[0]


def _elastic_field(generator: torch.Generator, sigma: float, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """Gaussian white noise drawn on a (2, H + 2r, W + 2r) field and smoothed without padding (so the field is
    stationary up to the border): (2, H, W), unit variance per pixel, on ``generator``'s device."""
    rows, cols = _smoothing_matrix(height, sigma, dtype), _smoothing_matrix(width, sigma, dtype)
    noise = torch.randn(2, rows.shape[1], cols.shape[1], generator=generator, device=generator.device, dtype=dtype)
    return rows.to(noise.device) @ noise @ cols.to(noise.device).T


def _affine_matrix(u: Tensor, max_shift: float, max_rotation: float, scale: tuple[float, float],
                   height: int, width: int) -> Tensor:
    """The (2, 3) sampling map (output -> input, normalized coordinates) of a rotation, isotropic scaling and shift
    drawn from ``u`` (4,) uniform in [0, 1); rotation and scaling act in pixel units, so non-square images are not
    sheared."""
    angle = math.radians(max_rotation) * (2.0 * float(u[0]) - 1.0)
    zoom = scale[0] + (scale[1] - scale[0]) * float(u[1])
    shift_x, shift_y = (2.0 * max_shift * (2.0 * float(v) - 1.0) for v in (u[2], u[3]))  # normalized units
    cos, sin, aspect = math.cos(angle) / zoom, math.sin(angle) / zoom, width / height
    # input = D^-1 R(-angle) D (output - shift) / zoom with D = diag(W/2, H/2)
    a = [[cos, sin / aspect], [-sin * aspect, cos]]
    b = [-(a[0][0] * shift_x + a[0][1] * shift_y), -(a[1][0] * shift_x + a[1][1] * shift_y)]
    return torch.tensor([[a[0][0], a[0][1], b[0]], [a[1][0], a[1][1], b[1]]], dtype=torch.float64)


def random_affine_elastic(
    x: Tensor,
    generator: torch.Generator,
    max_shift: float,
    max_rotation: float,
    scale: tuple[float, float],
    elastic_alpha: float,
    elastic_sigma: float,
    background: float,
) -> Tensor:
    """One random affine + elastic variant of image ``x`` (C, H, W) -> (C, H, W), same dtype and device.

    The content is rotated by an angle uniform in ``±max_rotation`` degrees, scaled by a factor uniform in ``scale``
    and shifted by a fraction of the image side uniform in ``±max_shift`` (per axis); on top, every pixel is displaced
    by an elastic field: Gaussian white noise smoothed with a Gaussian of std ``elastic_sigma`` pixels, normalized to
    unit variance and scaled by ``elastic_alpha`` pixels (so ``elastic_alpha`` is the per-axis RMS displacement).
    Resampling is bilinear (``F.grid_sample``); pixels from outside the image take the value ``background`` (the
    normalized background, e.g. -1.0 for black with mean = std = 0.5). All randomness comes from ``generator``
    (4 uniforms, then the noise field when ``elastic_alpha > 0``). With all magnitudes zero this is the identity.
    ``x`` must be floating point; the parameters are not checked here (:class:`AugmentedDataset` checks them).
    """
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"`x` must be one floating-point image (C, H, W), got {x.dtype} of shape {tuple(x.shape)}.")
    _, height, width = x.shape
    gen_device = generator.device
    u = torch.rand(4, generator=generator, device=gen_device, dtype=torch.float64).cpu()
    theta = _affine_matrix(u, max_shift, max_rotation, scale, height, width).to(x.dtype)
    grid = _identity_grid(height, width, x.dtype) @ theta[:, :2].T + theta[:, 2]  # (H, W, 2) as F.affine_grid
    grid = grid.to(x.device)
    if elastic_alpha > 0:
        field = _elastic_field(generator, elastic_sigma, height, width, x.dtype).to(x.device)
        pixels_to_normalized = torch.tensor([2.0 / width, 2.0 / height], dtype=x.dtype, device=x.device)
        grid = grid + elastic_alpha * field.permute(1, 2, 0) * pixels_to_normalized
    shifted = (x - background).unsqueeze(0)  # zero padding of the shifted image = `background` after shifting back
    out = F.grid_sample(shifted, grid.unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0] + background


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_transform_args(max_shift: float, max_rotation: float, scale: tuple[float, float], elastic_alpha: float,
                         elastic_sigma: float, background: float) -> tuple[float, float]:
    """Raise ``ValueError`` naming the first bad transform argument; return ``scale`` as a tuple of floats."""
    _check("max_shift", max_shift, _finite(max_shift) and 0.0 <= max_shift < 0.5, "a number in [0, 0.5)")
    _check("max_rotation", max_rotation, _finite(max_rotation) and 0.0 <= max_rotation <= 180.0,
           "a number of degrees in [0, 180]")
    pair = isinstance(scale, (tuple, list)) and len(scale) == 2 and all(_finite(s) for s in scale)
    _check("scale", scale, pair and 0.0 < scale[0] <= scale[1], "a pair (low, high) with 0 < low <= high")
    _check("elastic_alpha", elastic_alpha, _finite(elastic_alpha) and elastic_alpha >= 0.0, "a number >= 0 (pixels)")
    _check("elastic_sigma", elastic_sigma, _finite(elastic_sigma) and 0.0 <= elastic_sigma <= 100.0,
           "a number of pixels in [0, 100]")
    _check("background", background, _finite(background), "a finite number")
    return float(scale[0]), float(scale[1])


class AugmentedDataset(Dataset):
    """``size`` items ``{"image": (C, H, W), "label": int, "index": int}`` from a base set of ``n`` dict items.

    Item ``i < n`` is ``base[i]`` unchanged (so the real images are the prefix of any virtual set); item ``i >= n`` is
    ``base[i % n]`` with its label kept and its image under :func:`random_affine_elastic`, drawn from a generator
    seeded by ``(seed, i)`` only. ``index`` is always the virtual position ``i``. Other keys of the base items are
    passed through. Items are bitwise reproducible across instances, processes and calls.

    Args:
        base: map-style data set of dicts with an ``image`` tensor (C, H, W) and a ``label``
            (e.g. :class:`~lightning_attr.data.IndexedImageDataset`).
        size: number of virtual items, ``>= 1``.
        seed: seed of the transforms.
        max_shift, max_rotation, scale, elastic_alpha, elastic_sigma, background: see :func:`random_affine_elastic`.
    """

    def __init__(
        self,
        base: Dataset,
        size: int,
        seed: int = 0,
        max_shift: float = 0.1,
        max_rotation: float = 15.0,
        scale: tuple[float, float] = (0.9, 1.1),
        elastic_alpha: float = 2.0,
        elastic_sigma: float = 3.0,
        background: float = -1.0,
    ) -> None:
        _check("size", size, _integer(size) and size >= 1, "an integer >= 1")
        _check("seed", seed, _integer(seed), "an integer")
        _check("base", f"a data set of length {len(base)}", len(base) >= 1, "a non-empty data set")
        scale = _check_transform_args(max_shift, max_rotation, scale, elastic_alpha, elastic_sigma, background)
        self.base, self.size, self.seed = base, int(size), int(seed)
        self.params = dict(max_shift=float(max_shift), max_rotation=float(max_rotation), scale=scale,
                           elastic_alpha=float(elastic_alpha), elastic_sigma=float(elastic_sigma),
                           background=float(background))

    def __len__(self) -> int:
        return self.size

    @property
    def fingerprint(self) -> str | None:
        """Hex SHA-256 of the base's ``dataset_fingerprint``, ``size``, ``seed``, the transform parameters and the
        transform's version; ``None`` when the base has no fingerprint. Keys on-disk caches of per-item results."""
        inner = dataset_fingerprint(self.base)
        if inner is None:
            return None
        settings = dict(algorithm=_ALGORITHM, base=inner, size=self.size, seed=self.seed, **self.params)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def generator(self, i: int) -> torch.Generator:
        """The generator of item ``i``'s transform, seeded by a hash of ``(seed, i)`` and nothing else."""
        digest = hashlib.blake2b(f"{self.seed}:{i}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for an AugmentedDataset of size {self.size}.")
        n = len(self.base)
        item = dict(self.base[i % n])
        if i >= n:
            item["image"] = random_affine_elastic(item["image"], self.generator(i), **self.params)
        item["index"] = i
        return item


class AugmentedImageDataModule(ImageDataModule):
    """An :class:`ImageDataModule` whose train split is a virtual :class:`AugmentedDataset` of ``train_size`` items
    over the real train split (its prefix); val / test stay the held-out real images.

    ``noisy_mask`` covers the virtual split: an augmented copy is mislabeled exactly when its original is. Wrapped by
    :class:`~lightning_attr.data.OracleDataModule` it needs nothing else: labels are keyed by the virtual index and
    cached under the augmented split's ``fingerprint``.

    Args:
        train_size: virtual train items (the real train images first, then augmented copies cycling through them).
        augment_seed: seed of the transforms (independent of the split ``seed``).
        max_shift, max_rotation, scale, elastic_alpha, elastic_sigma: see :func:`random_affine_elastic`.
        background: value of pixels from outside the image; ``None``: black after normalization, ``-mean / std``.
        **kwargs: the arguments of :class:`ImageDataModule` (``dataset``, ``image_size``, ``batch_size``, ...).
    """

    def __init__(
        self,
        train_size: int = 20_000,
        augment_seed: int = 0,
        max_shift: float = 0.1,
        max_rotation: float = 15.0,
        scale: tuple[float, float] = (0.9, 1.1),
        elastic_alpha: float = 2.0,
        elastic_sigma: float = 3.0,
        background: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check("train_size", train_size, _integer(train_size) and train_size >= 1, "an integer >= 1")
        _check("augment_seed", augment_seed, _integer(augment_seed), "an integer")
        background = -self.mean / self.std if background is None else background
        scale = _check_transform_args(max_shift, max_rotation, scale, elastic_alpha, elastic_sigma, background)
        self.train_size, self.augment_seed = int(train_size), int(augment_seed)
        self.augment = dict(max_shift=max_shift, max_rotation=max_rotation, scale=scale, elastic_alpha=elastic_alpha,
                            elastic_sigma=elastic_sigma, background=background)

    @property
    def num_classes(self) -> int:
        self.setup()
        return _class_count(self.splits["train"].base.data, self.label_column)

    def setup(self, stage: str | None = None) -> None:
        if isinstance(self.splits.get("train"), AugmentedDataset):
            return
        super().setup(stage)
        real = self.splits["train"]
        self.splits["train"] = AugmentedDataset(real, self.train_size, seed=self.augment_seed, **self.augment)
        self.noisy_mask = self.noisy_mask[torch.arange(self.train_size) % len(real)]
