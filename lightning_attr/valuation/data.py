"""What is valued: points with features for the utility, (possibly noisy) labels, a clean validation set, and the
inputs the amortized model sees. Sources build it from digits (embedded default), any ``datasets.Dataset`` with
feature and label columns, or scikit-learn's ``make_classification``."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ValuationData", "ValuationSource", "DigitsSource", "DatasetSource", "SyntheticSource", "flip_labels"]


@dataclass
class ValuationData:
    """``x_train`` (N, D) utility features of the valued points, ``y_train`` (N,) their labels, ``x_val`` / ``y_val``
    the utility's validation set, ``flipped`` (N,) bool (labels corrupted on purpose), ``inputs`` (N, ...) what the
    amortized model reads per point (default: ``x_train``)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int
    flipped: Tensor
    inputs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.inputs is None:
            self.inputs = self.x_train
        if len(self.inputs) != len(self.x_train) or len(self.flipped) != len(self.x_train):
            raise ValueError("`inputs` and `flipped` need one row per valued point.")

    def fingerprint(self) -> str:
        digest = hashlib.sha1()
        for t in (self.x_train, self.y_train, self.x_val, self.y_val, self.inputs):
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:12]


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replace the labels of ``round(fraction * n)`` random points by another uniformly random class: (labels,
    flipped mask)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"`flip_fraction` must lie in [0, 1), got {fraction}.")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(y))[: int(round(fraction * len(y)))]
    noisy = y.copy()
    noisy[chosen] = (y[chosen] + rng.integers(1, num_classes, len(chosen))) % num_classes
    flipped = np.zeros(len(y), dtype=bool)
    flipped[chosen] = True
    return noisy, flipped


def _standardized(train: np.ndarray, val: np.ndarray) -> tuple[Tensor, Tensor]:
    mean, std = train.mean(0), train.std(0) + 1e-8
    return torch.as_tensor((train - mean) / std, dtype=torch.float32), torch.as_tensor((val - mean) / std,
                                                                                      dtype=torch.float32)


def _split(x: np.ndarray, y: np.ndarray, num_train: int, flip_fraction: float, num_classes: int,
           seed: int) -> ValuationData:
    if not 2 <= num_train < len(x):
        raise ValueError(f"`num_train` must lie in 2..{len(x) - 1} (the rest is the validation set), got {num_train}.")
    rows = np.random.default_rng(seed).permutation(len(x))
    train, val = rows[:num_train], rows[num_train:]
    noisy, flipped = flip_labels(y[train], flip_fraction, num_classes, seed + 1)
    x_train, x_val = _standardized(x[train], x[val])
    return ValuationData(x_train, torch.as_tensor(noisy), x_val, torch.as_tensor(y[val]), num_classes,
                         torch.as_tensor(flipped))


class ValuationSource(ABC):
    """Builds the :class:`ValuationData` of a run (configs name a subclass by ``class_path``)."""

    @abstractmethod
    def load(self) -> ValuationData: ...


class DigitsSource(ValuationSource):
    """scikit-learn's digits (ships with it): ``num_train`` valued points with ``flip_fraction`` of their labels
    flipped, the rest (clean) as the utility's validation set; features: the 64 standardized pixels.

    ``image_size``: the model reads each point as a 1-channel image of that size (bilinear, normalized to [-1, 1]),
    for a ``ValuationModel`` with a timm ``backbone``; the utility keeps the pixel features."""

    def __init__(self, num_train: int = 1000, flip_fraction: float = 0.2, seed: int = 0,
                 image_size: int | None = None) -> None:
        self.num_train, self.flip_fraction, self.seed, self.image_size = num_train, flip_fraction, seed, image_size

    def load(self) -> ValuationData:
        from sklearn.datasets import load_digits

        raw = load_digits()
        data = _split(raw.data.astype(np.float64), raw.target, self.num_train, self.flip_fraction, 10, self.seed)
        if self.image_size:
            rows = np.random.default_rng(self.seed).permutation(len(raw.data))[: self.num_train]  # as in _split
            pixels = torch.as_tensor(raw.images[rows], dtype=torch.float32).unsqueeze(1) / 16
            images = torch.nn.functional.interpolate(pixels, size=(self.image_size,) * 2, mode="bilinear")
            data.inputs = (images - 0.5) / 0.5
        return data


class SyntheticSource(ValuationSource):
    """scikit-learn's ``make_classification`` (``num_points`` valued points plus ``num_val``), for scaling studies."""

    def __init__(self, num_points: int = 1000, num_val: int = 1000, num_features: int = 20, num_classes: int = 2,
                 flip_fraction: float = 0.2, seed: int = 0) -> None:
        self.num_points, self.num_val, self.num_features = num_points, num_val, num_features
        self.num_classes, self.flip_fraction, self.seed = num_classes, flip_fraction, seed

    def load(self) -> ValuationData:
        from sklearn.datasets import make_classification

        x, y = make_classification(self.num_points + self.num_val, self.num_features, n_informative=self.num_features
                                   // 2, n_classes=self.num_classes, random_state=self.seed)
        return _split(x, y, self.num_points, self.flip_fraction, self.num_classes, self.seed)


class DatasetSource(ValuationSource):
    """Any ``datasets.Dataset`` (a hub name for ``load_dataset``, or a folder saved with ``save_to_disk``) with
    numeric ``feature_columns`` and an integer ``label_column``; ``num_train`` valued points, the rest validates."""

    def __init__(self, path: str, feature_columns: list[str], label_column: str = "label", num_train: int = 1000,
                 flip_fraction: float = 0.0, split: str = "train", seed: int = 0) -> None:
        self.path, self.feature_columns, self.label_column = path, list(feature_columns), label_column
        self.num_train, self.flip_fraction, self.split, self.seed = num_train, flip_fraction, split, seed

    def _dataset(self):
        import os

        import datasets

        if os.path.isdir(self.path):
            data = datasets.load_from_disk(self.path)
            return data[self.split] if isinstance(data, datasets.DatasetDict) else data
        return datasets.load_dataset(self.path, split=self.split)

    def load(self) -> ValuationData:
        data = self._dataset()
        missing = [c for c in [*self.feature_columns, self.label_column] if c not in data.column_names]
        if missing:
            raise ValueError(f"{self.path!r} has no column(s) {missing} (`feature_columns` / `label_column`); it has "
                             f"{data.column_names}.")
        table = data.with_format("numpy")
        x = np.stack([np.asarray(table[c], dtype=np.float64) for c in self.feature_columns], 1)
        y = np.asarray(table[self.label_column])
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ValueError(f"`label_column`={self.label_column!r} must hold class indices 0..K-1, got {y.dtype} "
                             f"values from {y.min()!r}.")
        return _split(x, y, self.num_train, self.flip_fraction, int(y.max()) + 1, self.seed)
