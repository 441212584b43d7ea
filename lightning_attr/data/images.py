"""Image classification data from Hugging Face ``datasets`` (hub, ``save_to_disk`` folders, image folders, digits)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_attr.data.digits import digits_dataset
from lightning_attr.data.samplers import UnpaddedDistributedSampler

__all__ = ["ImageDataModule", "IndexedImageDataset", "dataset_fingerprint", "load_image_dataset"]


def load_image_dataset(name: str, image_size: int = 32):
    """A ``datasets.Dataset`` or ``DatasetDict`` from ``name``.

    ``"digits"``: the embedded scikit-learn digits. A folder written by ``save_to_disk``: ``load_from_disk``. Any other
    existing folder: the ``imagefolder`` builder (one sub-folder per class). Otherwise: ``load_dataset(name)`` from
    the hub (needs network).
    """
    import datasets

    if name == "digits":
        return digits_dataset(image_size)
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "dataset_dict.json")) or os.path.exists(os.path.join(name, "state.json")):
            return datasets.load_from_disk(name)
        return datasets.load_dataset("imagefolder", data_dir=name)
    try:
        return datasets.load_dataset(name)
    except Exception as err:  # offline, unknown name, ...
        raise ValueError(
            f"`dataset`={name!r} is neither 'digits', an existing folder (save_to_disk output or image folder), nor a "
            f"data set the hub could serve ({type(err).__name__}: {err})."
        ) from err


class IndexedImageDataset(Dataset):
    """Items ``{"image": (C, H, W) float, "label": int, "index": int}`` from a ``datasets.Dataset``.

    ``index`` is the item's stable position in this split; attribution results are keyed by it.
    Images are converted to ``channels`` channels, resized to ``image_size`` and normalized with ``mean`` / ``std``.
    When the whole split's decoded images fit in ``cache_mb`` MiB (digits: 6 MiB), each is decoded once and kept
    (every later epoch reads memory instead of decoding); larger splits are decoded on every access.
    """

    def __init__(
        self,
        hf_dataset: Any,
        image_size: int,
        channels: int = 3,
        mean: float = 0.5,
        std: float = 0.5,
        image_column: str = "image",
        label_column: str = "label",
        indices: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        cache_mb: float = 256.0,
    ) -> None:
        for col in (image_column, label_column):
            if col not in hf_dataset.column_names:
                raise ValueError(f"Column {col!r} not in the data set; available columns: {hf_dataset.column_names}.")
        self.data = hf_dataset
        self.indices = np.arange(len(hf_dataset)) if indices is None else np.asarray(indices)
        self.image_size, self.channels, self.mean, self.std = image_size, channels, mean, std
        self.image_column, self.label_column = image_column, label_column
        self.labels = None if labels is None else np.asarray(labels)  # overrides the column (e.g. flipped labels)
        decoded_mb = len(self.indices) * channels * image_size**2 * 4 / 2**20
        self._decoded: dict[int, tuple[Tensor, int]] | None = {} if decoded_mb <= cache_mb else None

    def __len__(self) -> int:
        return len(self.indices)

    def to_tensor(self, image: Any) -> Tensor:
        """PIL image -> normalized (C, H, W) float tensor."""
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        image = image.convert(mode)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        arr = arr.unsqueeze(0) if arr.dim() == 2 else arr.permute(2, 0, 1)
        return (arr - self.mean) / self.std

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of what determines this split's items: the source data set (the ``datasets`` fingerprint, a
        hash of its content or of its files), the split's rows and labels, and the preprocessing (size, channels,
        mean, std, columns). Keys on-disk caches of per-example results."""
        source = getattr(self.data, "_fingerprint", None) or f"{type(self.data).__name__}:{len(self.data)}"
        settings = dict(source=source, image_size=self.image_size, channels=self.channels, mean=self.mean,
                        std=self.std, image_column=self.image_column, label_column=self.label_column)
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes())
        if self.labels is not None:
            digest.update(b"labels" + np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if self._decoded is not None and i in self._decoded:
            image, label = self._decoded[i]
            return {"image": image, "label": label, "index": i}
        row = self.data[int(self.indices[i])]
        label = int(row[self.label_column]) if self.labels is None else int(self.labels[i])
        image = self.to_tensor(row[self.image_column])
        if self._decoded is not None:
            self._decoded[i] = (image, label)
        return {"image": image, "label": label, "index": i}


def _class_count(data: Any, label_column: str) -> int:
    """Classes of a ``datasets.Dataset``'s label column: its ``ClassLabel`` size, else the largest label + 1."""
    feature = data.features[label_column]
    return int(getattr(feature, "num_classes", 0)) or int(max(data[label_column]) + 1)


def dataset_fingerprint(dataset: Dataset) -> str | None:
    """The ``fingerprint`` of a dataset (e.g. :class:`IndexedImageDataset`), of a ``Subset`` of one (with its
    indices), or ``None`` when it has none."""
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        if inner is None:
            return None
        rows = np.asarray(list(dataset.indices), dtype=np.int64).tobytes()
        return hashlib.sha256(inner.encode() + b"subset" + rows).hexdigest()
    value = getattr(dataset, "fingerprint", None)
    return value if isinstance(value, str) else None


class ImageDataModule(L.LightningDataModule):
    """Train / val / test image classification loaders; batches are dicts with ``image``, ``label``, ``index``.

    Args:
        dataset: ``"digits"`` (embedded default), a ``save_to_disk`` folder, an image folder, or a hub name.
        image_size: images are resized to ``image_size x image_size``.
        channels: 3 (RGB, what timm models expect) or 1.
        val_fraction / test_fraction: carved from ``train`` (seeded) when the data set lacks those splits.
        batch_size, num_workers: loader settings; evaluation loaders are never shuffled.
        seed: seed of the split.
        label_noise: fraction of training labels replaced by a different, uniformly random class (seeded by
            ``noise_seed``); ``noisy_mask`` (bool, length of the train split) says which, for noisy-label detection.
    """

    def __init__(
        self,
        dataset: str = "digits",
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        image_column: str = "image",
        label_column: str = "label",
        mean: float = 0.5,
        std: float = 0.5,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"`label_noise` must be in [0, 1), got {label_noise}.")
        if channels not in (1, 3):
            raise ValueError(f"`channels` must be 1 or 3, got {channels}.")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {frac}.")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"`val_fraction` + `test_fraction` must be < 1, got {val_fraction + test_fraction}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.dataset, self.image_size, self.channels, self.batch_size = dataset, image_size, channels, batch_size
        self.val_fraction, self.test_fraction, self.num_workers, self.seed = val_fraction, test_fraction, num_workers, seed
        self.image_column, self.label_column, self.mean, self.std = image_column, label_column, mean, std
        self.label_noise, self.noise_seed = label_noise, noise_seed
        self.splits: dict[str, IndexedImageDataset] = {}
        self.noisy_mask: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        self.setup()
        return _class_count(self.splits["train"].data, self.label_column)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self
        data = load_image_dataset(hp.dataset, hp.image_size)
        kw = dict(image_size=hp.image_size, channels=hp.channels, mean=hp.mean, std=hp.std,
                  image_column=hp.image_column, label_column=hp.label_column)
        parts = dict(data) if hasattr(data, "keys") else {"train": data}
        if "train" not in parts:
            raise ValueError(f"`dataset`={hp.dataset!r} has no 'train' split; splits: {sorted(parts)}.")
        train = parts["train"]
        order = np.random.default_rng(hp.seed).permutation(len(train))
        n_test = 0 if "test" in parts else int(round(hp.test_fraction * len(train)))
        val_name = "validation" if "validation" in parts else ("val" if "val" in parts else None)
        n_val = 0 if val_name else int(round(hp.val_fraction * len(train)))
        test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        train_idx = np.sort(train_idx)
        labels = np.asarray(train[hp.label_column])[train_idx]
        self.noisy_mask = torch.zeros(len(train_idx), dtype=torch.bool)
        if hp.label_noise > 0:
            rng = np.random.default_rng(hp.noise_seed)
            flip = rng.choice(len(train_idx), int(round(hp.label_noise * len(train_idx))), replace=False)
            k = int(labels.max()) + 1
            labels = labels.copy()
            labels[flip] = (labels[flip] + rng.integers(1, k, len(flip))) % k
            self.noisy_mask[torch.as_tensor(flip)] = True
        self.splits["train"] = IndexedImageDataset(train, indices=train_idx, labels=labels, **kw)
        self.splits["val"] = (
            IndexedImageDataset(parts[val_name], **kw) if val_name else IndexedImageDataset(train, indices=np.sort(val_idx), **kw)
        )
        self.splits["test"] = (
            IndexedImageDataset(parts["test"], **kw) if "test" in parts else IndexedImageDataset(train, indices=np.sort(test_idx), **kw)
        )

    def loader(self, split: str, shuffle: bool = False, dataset: Dataset | None = None) -> DataLoader:
        """A loader over ``split`` (or over ``dataset``); unshuffled loaders shard without padding under DDP."""
        self.setup()
        ds = dataset if dataset is not None else self.splits[split]
        sampler = None
        if not shuffle and self.trainer is not None and self.trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(ds, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")
