"""LightningDataModules: image data (HF ``datasets``, embedded digits) and on-the-fly oracle labels."""

from lightning_attr.data.augment import AugmentedDataset, AugmentedImageDataModule, random_affine_elastic
from lightning_attr.data.digits import digits_dataset
from lightning_attr.data.images import ImageDataModule, IndexedImageDataset, load_image_dataset
from lightning_attr.data.indexed import IndexedDataset, items_at, unpack_batch
from lightning_attr.data.label_store import LabelStore
from lightning_attr.data.oracle import OracleDataModule
from lightning_attr.data.samplers import UnpaddedDistributedSampler

__all__ = ["AugmentedDataset", "AugmentedImageDataModule", "ImageDataModule", "IndexedDataset", "IndexedImageDataset",
           "LabelStore", "OracleDataModule", "UnpaddedDistributedSampler", "digits_dataset", "items_at",
           "load_image_dataset", "random_affine_elastic", "unpack_batch"]
