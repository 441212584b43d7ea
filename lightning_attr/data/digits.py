"""The embedded default data set: scikit-learn's digits as a real ``datasets.Dataset`` of 32x32 images."""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["digits_dataset"]


@functools.lru_cache(maxsize=4)
def digits_dataset(image_size: int = 32):
    """scikit-learn's 1,797 8x8 digits, upsampled (bilinear) to ``image_size`` and served as a ``datasets.Dataset``.

    Columns: ``image`` (``datasets.Image``, grayscale PIL) and ``label`` (``datasets.ClassLabel`` with 10 names).
    Ships inside scikit-learn, so it needs no network.
    """
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels = np.clip(raw.images * 16.0, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    images = [Image.fromarray(p, mode="L").resize((image_size, image_size), Image.BILINEAR) for p in pixels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": raw.target.tolist()}, features=features)
