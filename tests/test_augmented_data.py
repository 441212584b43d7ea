"""AugmentedDataset / AugmentedImageDataModule: a virtual training set of distinct affine + elastic digit variants
with stable indices; reproducible, the real images as its prefix, known geometry, and oracle labels per virtual index
(once per epoch under 2-process DDP, cached per index across runs)."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import explainer_kwargs
from torch.utils.data import Dataset

from lightning_attr import AmortizedExplainer, AugmentedImageDataModule, ImageDataModule, OracleDataModule
from lightning_attr.data import AugmentedDataset, IndexedImageDataset, digits_dataset, random_affine_elastic
from lightning_attr.estimators import exact_shapley, get_estimator

ZERO = dict(max_shift=0.0, max_rotation=0.0, scale=(1.0, 1.0), elastic_alpha=0.0)
NONE = dict(max_shift=0.0, max_rotation=0.0, scale=(1.0, 1.0), elastic_alpha=0.0, elastic_sigma=3.0, background=-1.0)


@pytest.fixture(scope="module")
def base() -> IndexedImageDataset:
    """The first 10 digits at 16x16, RGB, normalized to [-1, 1] (background -1)."""
    return IndexedImageDataset(digits_dataset(16), image_size=16, indices=np.arange(10))


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory) -> str:
    """A ``save_to_disk`` folder of 16 digits: with 2 val and 2 test images, a real train split of 12."""
    folder = str(tmp_path_factory.mktemp("data") / "tiny_digits")
    digits_dataset(16).select(range(16)).save_to_disk(folder)
    return folder


class Plain(Dataset):
    """Dict items without a ``fingerprint``."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 8, 8), float(i)), "label": i}


def test_items_are_reproducible_and_indexed_by_virtual_position(base):
    a, b = AugmentedDataset(base, 50, seed=3), AugmentedDataset(base, 50, seed=3)
    assert len(a) == 50
    for i in (0, 9, 10, 11, 27, 49):
        first, again, other = a[i], a[i], b[i]
        assert first["index"] == other["index"] == i
        assert torch.equal(first["image"], again["image"]) and torch.equal(first["image"], other["image"])
    threads = torch.get_num_threads()
    try:  # bitwise the same whatever the thread count (DataLoader workers run with one thread)
        torch.set_num_threads(1)
        single = a[33]["image"]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, b[33]["image"])
    assert a[-1]["index"] == 49
    with pytest.raises(IndexError, match="50"):
        a[50]


def test_real_images_are_the_prefix_and_copies_are_distinct_variants(base):
    data = AugmentedDataset(base, 40)
    for i in range(10):
        assert torch.equal(data[i]["image"], base[i]["image"]) and data[i]["label"] == base[i]["label"]
    copies = [data[i] for i in (3, 13, 23, 33)]  # one digit, four versions
    assert {c["label"] for c in copies} == {base[3]["label"]}
    images = [c["image"] for c in copies]
    for j in range(4):
        for k in range(j + 1, 4):
            assert (images[j] - images[k]).abs().max() > 0.2
    # the variants stay images of the digit: correlated with the original, in range, background where nothing moved
    for image in images[1:]:
        assert torch.corrcoef(torch.stack([image.flatten(), images[0].flatten()]))[0, 1] > 0.3
        assert image.min() >= -1.0 - 1e-6 and image.max() <= base[3]["image"].max() + 1e-6
    other_seed = AugmentedDataset(base, 40, seed=1)
    assert all((other_seed[i]["image"] - data[i]["image"]).abs().max() > 0.2 for i in (13, 23, 33))


def test_zero_magnitudes_are_the_identity(base):
    torch.manual_seed(0)
    for x in (base[4]["image"], torch.randn(3, 12, 20), torch.randn(1, 7, 5, dtype=torch.float64)):
        out = random_affine_elastic(x, torch.Generator().manual_seed(5), elastic_sigma=3.0, background=-1.0, **ZERO)
        assert out.dtype == x.dtype and out.shape == x.shape
        torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    identity = AugmentedDataset(base, 20, **ZERO)
    for i in (10, 15, 19):
        torch.testing.assert_close(identity[i]["image"], base[i - 10]["image"], rtol=0, atol=1e-5)


def centroid(x: torch.Tensor, background: float) -> torch.Tensor:
    """(x, y) centre of mass of ``x - background`` (1, H, W) in pixels from the image centre (x right, y down)."""
    w = (x[0] - background).double()
    h_idx, w_idx = torch.meshgrid(torch.arange(w.shape[0], dtype=torch.float64),
                                  torch.arange(w.shape[1], dtype=torch.float64), indexing="ij")
    total = w.sum()
    return torch.stack([(w * w_idx).sum() / total - (w.shape[1] - 1) / 2,
                        (w * h_idx).sum() / total - (w.shape[0] - 1) / 2])


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
def test_affine_part_moves_content_as_drawn(height, width):
    """A blob at offset ``q`` from the centre lands at ``zoom * R(angle) q + shift * (W, H)`` where the four uniforms
    ``u`` the generator draws first give angle = max_rotation (2 u0 - 1) degrees, zoom = lo + (hi - lo) u1 and
    shift = max_shift (2 u2 - 1, 2 u3 - 1) (fractions of the side)."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    q = torch.tensor([5.0, -3.0], dtype=torch.float64)
    cx, cy = (width - 1) / 2 + float(q[0]), (height - 1) / 2 + float(q[1])
    x = (torch.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / (2 * 1.5**2)) * 2 - 1).unsqueeze(0)
    torch.testing.assert_close(centroid(x, -1.0), q, atol=1e-3, rtol=0)
    for seed in range(5):
        u = torch.rand(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        angle = math.radians(40.0 * (2 * float(u[0]) - 1))
        zoom = 0.8 + 0.4 * float(u[1])
        shift = torch.tensor([0.1 * (2 * float(u[2]) - 1) * width, 0.1 * (2 * float(u[3]) - 1) * height],
                             dtype=torch.float64)
        cos, sin = math.cos(angle), math.sin(angle)
        rot = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)  # pixels: x right, y down
        out = random_affine_elastic(x, torch.Generator().manual_seed(seed), max_shift=0.1, max_rotation=40.0,
                                    scale=(0.8, 1.2), elastic_alpha=0.0, elastic_sigma=3.0, background=-1.0)
        torch.testing.assert_close(centroid(out, -1.0), zoom * rot @ q + shift, atol=0.05, rtol=0)


def test_elastic_field_has_the_asked_rms_displacement_and_smoothness():
    """On a ramp image (value = column, or row) bilinear resampling is exact, so ``out - x`` is the displacement in
    pixels: its RMS per axis is ``elastic_alpha`` and neighbours move together (correlation exp(-1 / (4 sigma^2)))."""
    size, alpha, sigma = 48, 2.0, 3.0
    ramp = torch.arange(size, dtype=torch.float64).expand(size, size)
    x = torch.stack([ramp, ramp.T])  # channel 0: x coordinate, channel 1: y coordinate
    moves = []
    for seed in range(20):
        out = random_affine_elastic(x, torch.Generator().manual_seed(seed), max_shift=0.0, max_rotation=0.0,
                                    scale=(1.0, 1.0), elastic_alpha=alpha, elastic_sigma=sigma, background=0.0)
        moves.append((out - x)[:, 12:36, 12:36])  # away from the border: nothing sampled outside
    d = torch.stack(moves)  # (draws, 2, h, w)
    rms = d.pow(2).mean((0, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.full((2,), alpha, dtype=torch.float64), rtol=0.15), rms
    lag1 = torch.corrcoef(torch.stack([d[..., :-1].flatten(), d[..., 1:].flatten()]))[0, 1]
    assert abs(float(lag1) - math.exp(-1 / (4 * sigma**2))) < 0.03


def test_fingerprint_sees_every_setting(base):
    reference = dict(size=30, seed=0, max_shift=0.1, max_rotation=15.0, scale=(0.9, 1.1), elastic_alpha=2.0,
                     elastic_sigma=3.0, background=-1.0)
    changes = [dict(size=31), dict(seed=1), dict(max_shift=0.2), dict(max_rotation=10.0), dict(scale=(0.9, 1.2)),
               dict(scale=(0.8, 1.1)), dict(elastic_alpha=1.0), dict(elastic_sigma=2.0), dict(background=0.0)]
    prints = [AugmentedDataset(base, **{**reference, **change}).fingerprint for change in changes]
    same = AugmentedDataset(base, **reference).fingerprint
    assert same == AugmentedDataset(base, **reference).fingerprint
    assert len(same) == 64 and len(set(prints + [same])) == len(changes) + 1
    other_base = IndexedImageDataset(digits_dataset(16), image_size=16, indices=np.arange(1, 11))
    assert AugmentedDataset(other_base, **reference).fingerprint != same
    assert AugmentedDataset(Plain(), 5).fingerprint is None


@pytest.mark.parametrize("kwargs, name", [
    (dict(size=0), "size"), (dict(size=2.5), "size"), (dict(seed="a"), "seed"),
    (dict(max_shift=0.5), "max_shift"), (dict(max_shift=-0.1), "max_shift"),
    (dict(max_rotation=181.0), "max_rotation"), (dict(max_rotation=-1.0), "max_rotation"),
    (dict(scale=(1.1, 0.9)), "scale"), (dict(scale=(0.0, 1.0)), "scale"), (dict(scale=(1.0,)), "scale"),
    (dict(elastic_alpha=-1.0), "elastic_alpha"), (dict(elastic_sigma=-0.5), "elastic_sigma"),
    (dict(background=float("nan")), "background"),
])
def test_bad_arguments_are_named(base, kwargs, name):
    kwargs = {"size": 20, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}` must be") as err:
        AugmentedDataset(base, **kwargs)
    assert f"got {kwargs[name]!r}" in str(err.value)  # the value, and what is allowed, in the message
    if name not in ("size", "seed"):
        with pytest.raises(ValueError, match=f"`{name}` must be"):
            AugmentedImageDataModule(**{k: v for k, v in kwargs.items() if k != "size"})


def test_bad_datamodule_arguments_and_images_are_named():
    with pytest.raises(ValueError, match="`train_size` must be an integer >= 1, got 0"):
        AugmentedImageDataModule(train_size=0)
    with pytest.raises(ValueError, match="`augment_seed` must be an integer"):
        AugmentedImageDataModule(augment_seed=0.5)
    with pytest.raises(ValueError, match="`base` must be a non-empty data set"):
        AugmentedDataset(torch.utils.data.TensorDataset(torch.zeros(0, 1)), 5)
    with pytest.raises(ValueError, match=r"`x` must be one floating-point image \(C, H, W\).*\(2, 1, 8, 8\)"):
        random_affine_elastic(torch.zeros(2, 1, 8, 8), torch.Generator(), **NONE)


def test_datamodule_wraps_the_train_split_only(tmp_path):
    kw = dict(dataset="digits", image_size=16, label_noise=0.2, noise_seed=1)
    plain, aug = ImageDataModule(**kw), AugmentedImageDataModule(train_size=3000, augment_seed=2, **kw)
    plain.setup()
    aug.setup()
    aug.setup()  # idempotent: not wrapped twice
    train, real = aug.splits["train"], plain.splits["train"]
    assert isinstance(train, AugmentedDataset) and len(train) == 3000 and train.base.fingerprint == real.fingerprint
    assert train.seed == 2 and train.params["background"] == -1.0  # black after normalization: -mean / std
    for split in ("val", "test"):
        assert aug.splits[split].fingerprint == plain.splits[split].fingerprint
    n = len(real)
    assert torch.equal(aug.noisy_mask, plain.noisy_mask[torch.arange(3000) % n])
    flipped = int(torch.nonzero(plain.noisy_mask)[0])
    assert train[flipped + n]["label"] == real[flipped]["label"] and aug.noisy_mask[flipped + n]
    assert aug.num_classes == 10
    assert AugmentedImageDataModule(train_size=5, mean=0.25, std=0.5).augment["background"] == -0.5


class IndexLog(L.Callback):
    """Writes, per rank and epoch, the labelled train indices and the train-label evaluations to ``folder``."""

    def __init__(self, folder) -> None:
        self.folder, self.indices, self.before = folder, [], 0

    def on_train_epoch_start(self, trainer, module):
        self.indices, self.before = [], trainer.datamodule.evaluations["train"]

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        assert batch["labels"].shape[0] == batch["index"].shape[0]
        self.indices += batch["index"].tolist()

    def on_train_epoch_end(self, trainer, module):
        spent = trainer.datamodule.evaluations["train"] - self.before
        record = dict(indices=self.indices, evaluations=spent)
        (self.folder / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.json").write_text(json.dumps(record))


def oracle_fit(tmp_path, weights, folder, label_mode, devices=1, epochs=1, callbacks=(), **images_kw):
    """Fit an explainer on 48 virtual items over the 12 real train images of ``folder`` (4 versions of each)."""
    images = AugmentedImageDataModule(**{**dict(train_size=48, dataset=folder, image_size=16, batch_size=8,
                                                val_fraction=0.125, test_fraction=0.125), **images_kw})
    dm = OracleDataModule(images, estimator="permutation_shapley", num_samples=8, label_mode=label_mode,
                          cache_dir=str(tmp_path / "cache"), test_size=5)
    model = AmortizedExplainer(**explainer_kwargs(weights))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=devices, logger=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks), default_root_dir=str(tmp_path),
                        **(dict(strategy="ddp_spawn") if devices > 1 else {}))
    trainer.fit(model, dm)
    return dm, model


def evaluations_per_image(model) -> int:
    """Game evaluations of one label (permutation Shapley, budget 8) of one image, counted by the game."""
    before = model.game.num_evaluations
    get_estimator("permutation_shapley")(model.game, torch.randn(1, 3, 16, 16), 8)
    return model.game.num_evaluations - before


def test_ddp_fresh_labels_cover_every_virtual_index_once_per_epoch(tmp_path, vit_weights, tiny_digits):
    """``ddp_spawn``: forked children can hang in OpenMP once the parent has used its thread pool."""
    log = tmp_path / "log"
    log.mkdir()
    _, model = oracle_fit(tmp_path, vit_weights[0], tiny_digits, "fresh", devices=2, epochs=2,
                          callbacks=[IndexLog(log)])
    per_image = evaluations_per_image(model)
    assert per_image > 0
    for epoch in range(2):
        records = [json.loads((log / f"rank{r}-epoch{epoch}.json").read_text()) for r in range(2)]
        indices = records[0]["indices"] + records[1]["indices"]
        assert records[0]["indices"] and records[1]["indices"]  # both ranks labelled a share
        assert sorted(indices) == list(range(48))  # every virtual index exactly once
        assert sum(r["evaluations"] for r in records) == 48 * per_image


def test_fixed_labels_are_cached_per_virtual_index(tmp_path, vit_weights, tiny_digits):
    first, model = oracle_fit(tmp_path, vit_weights[0], tiny_digits, "fixed")
    assert first.evaluations["train"] == 48 * evaluations_per_image(model)
    labels = first.stores["train-fixed"]
    assert bool(labels.has(torch.arange(48)).all())
    # each label is of its own virtual image (efficient against the exact values), not of the real one behind it
    train = first.datamodule.splits["train"]
    assert len(train.base) == 12
    x = torch.stack([train[i]["image"] for i in (5, 17, 29, 41)])  # one real image and three versions of it
    got = labels.get(torch.tensor([5, 17, 29, 41]))
    totals = exact_shapley(model.game, x).sum(1)  # (4, K): v(all) - v(none) of each image
    torch.testing.assert_close(got.sum(1), totals, atol=1e-5, rtol=0)
    assert bool(((totals[1:] - totals[0]).abs().amax(-1) > 1e-4).all())  # the real image's labels would fail above
    second, _ = oracle_fit(tmp_path, vit_weights[0], tiny_digits, "fixed")
    assert second.evaluations["train"] == 0
    assert torch.equal(second.stores["train-fixed"].get(torch.arange(48)), labels.get(torch.arange(48)))
    # another augmentation seed is another data set: its own labels, nothing read from the first cache
    other, model = oracle_fit(tmp_path, vit_weights[0], tiny_digits, "fixed", augment_seed=1)
    assert other.evaluations["train"] == 48 * evaluations_per_image(model)
    assert len(list((tmp_path / "cache").glob("train-*-rank0.safetensors"))) == 2


def test_decoded_images_kept_in_memory_equal_fresh_decodes():
    """A split small enough for ``cache_mb`` is decoded once; its items equal those decoded on every access."""
    dm = ImageDataModule(image_size=16)
    dm.setup()
    kept = dm.splits["val"]
    fresh = IndexedImageDataset(kept.data, 16, indices=kept.indices, cache_mb=0.0)
    assert kept._decoded is not None and fresh._decoded is None
    for i in (0, 7, len(kept) - 1):
        first, again, other = kept[i], kept[i], fresh[i]
        assert torch.equal(first["image"], other["image"]) and torch.equal(again["image"], other["image"])
        assert first["label"] == other["label"] and first["index"] == other["index"] == i
    assert len(kept._decoded) == 3
