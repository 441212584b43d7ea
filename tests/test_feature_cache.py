"""FeatureCache and AmortizedExplainer(feature_cache=...): the frozen backbone and game run once per distinct example,
training is unchanged by caching (also under augmentation, which bypasses the cache), files persist and are checked."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import explainer_kwargs
from torch.utils.data import DataLoader, Dataset

from lightning_attr import AmortizedExplainer, ImageDataModule, OracleDataModule
from lightning_attr.io import CorruptArtifactError
from lightning_attr.modules import FeatureCache

N, D, K = 12, 4, 10  # examples, players (2x2 patches of 16x16 images), classes


# ----------------------------------------------------------------------------- FeatureCache alone
def _compute_counting(calls: list[int]):
    def compute(x):
        calls.append(len(x))
        flat = x.flatten(1)
        return flat[:, :6].reshape(-1, 2, 3) * 2, flat[:, :4].reshape(-1, 2, 2).float() + 1

    return compute


reference = _compute_counting([])


def test_fetch_computes_only_the_misses_and_keeps_batch_order():
    cache, calls = FeatureCache(), []
    compute = _compute_counting(calls)
    x = torch.randn(6, 1, 2, 4)
    index = torch.tensor([5, 0, 9, 3, 7, 1])
    feats, ends = cache.fetch(index[:4], x[:4], compute)
    assert calls == [4] and len(cache) == 4
    mixed = torch.tensor([2, 5, 0, 4])  # examples 9 and 5 hit, 1 and 7 miss
    feats, ends = cache.fetch(index[mixed], x[mixed], compute)
    assert calls == [4, 2] and len(cache) == 6
    want_f, want_e = reference(x[mixed])
    assert torch.equal(feats, want_f) and torch.equal(ends, want_e)
    feats, _ = cache.fetch(index, x.double(), compute)  # all hit: returned in x's dtype
    assert calls == [4, 2] and feats.dtype == torch.float64
    feats, _ = cache.fetch(index, x, compute)
    assert calls == [4, 2] and feats.dtype == torch.float32 and torch.equal(feats, reference(x)[0])
    assert cache.nbytes == 6 * (2 * 3 * 4 + 2 * 2 * 4 + 9 * 8)


def test_changed_image_is_computed_not_cached_and_warns_once():
    cache, calls = FeatureCache(), []
    compute = _compute_counting(calls)
    x, index = torch.randn(3, 1, 2, 4), torch.arange(3)
    cache.fetch(index, x, compute)
    y = x.clone()
    y[1] += 0.5
    with pytest.warns(UserWarning, match="FeatureCache bypassed.*indices \\[1\\]"):
        feats, _ = cache.fetch(index, y, compute)
    assert calls == [3, 1] and torch.equal(feats, reference(y)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.fetch(index, y, compute)
    assert calls == [3, 1, 1] and cache.bypassed == 2
    feats, _ = cache.fetch(index, x, compute)  # the cached image of index 1 still hits
    assert calls == [3, 1, 1] and torch.equal(feats, reference(x)[0])


def test_save_load_round_trip_and_wrong_key(tmp_path):
    cache, calls = FeatureCache(key="abc"), []
    compute = _compute_counting(calls)
    x = torch.randn(40, 1, 2, 4)
    cache.fetch(torch.arange(40) * 3, x, compute)
    path = str(tmp_path / "f.safetensors")
    cache.save(path)
    loaded = FeatureCache(key="abc")
    assert loaded.load(path) == 40 and not loaded.dirty
    feats, ends = loaded.fetch(torch.arange(40) * 3, x, compute)
    assert calls == [40] and torch.equal(feats, reference(x)[0]) and torch.equal(ends, reference(x)[1])
    y = x + 1  # other images than in the file under the same indices (the data changed): entries are replaced
    stale = FeatureCache(key="abc")
    stale.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stale.fetch(torch.arange(40) * 3, y, compute)
        stale.fetch(torch.arange(40) * 3, y, compute)
    assert calls == [40, 40] and len(stale) == 40 and stale.bypassed == 0 and stale.dirty
    with pytest.raises(CorruptArtifactError, match=f"{path}.*feature_cache_key='abc', not 'xyz'.*delete"):
        FeatureCache(key="xyz").load(path)


# ----------------------------------------------------------------------------- the explainer
class Jittered(Dataset):
    """N fixed images with fixed labels; ``jitter`` indices get a new random image at every access."""

    def __init__(self, jitter: set[int] = frozenset()) -> None:
        gen = torch.Generator().manual_seed(1)
        self.images = torch.randn(N, 3, 16, 16, generator=gen)
        self.labels = torch.randn(N, D, K, generator=gen) * 0.05
        self.jitter, self.calls = jitter, [0] * N

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        if i in self.jitter:
            self.calls[i] += 1
            image = image + 0.3 * torch.randn(image.shape, generator=torch.Generator().manual_seed(100 * i + self.calls[i]))
        return {"image": image, "index": i, "labels": self.labels[i]}


class Recorder(L.Callback):
    """Losses of every step, and rows through the backbone / the game inside training and validation steps."""

    def __init__(self, model: AmortizedExplainer) -> None:
        self.losses, self.val_losses, self.backbone_rows, self.game_rows, self.seen = [], [], 0, 0, []
        self.active = False
        model.features.model.patch_embed.register_forward_hook(self._backbone)
        model.game.register_forward_hook(self._game)

    def _backbone(self, module, args, out):
        self.backbone_rows += len(args[0])

    def _game(self, module, args, out):
        self.game_rows += len(args[0]) if self.active else 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = True
        self.seen.append(("train", batch["index"].tolist()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.active = False
        self.losses.append(outputs["loss"].item())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.active = True
        self.seen.append(("val", batch["index"].tolist()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.active = False

    def on_validation_epoch_end(self, trainer, pl_module):
        if "val/loss" in trainer.callback_metrics:
            self.val_losses.append(trainer.callback_metrics["val/loss"].item())

    def distinct(self) -> int:
        return len({(split, i) for split, index in self.seen for i in index})

    def rows(self) -> int:
        return sum(len(index) for _, index in self.seen)


def fit(tmp_path, weights, cache, data, epochs=3, **trainer_kw):
    L.seed_everything(0)
    model = AmortizedExplainer(**explainer_kwargs(weights, feature_cache=cache, dropout=0.1))
    recorder = Recorder(model)
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0, max_epochs=epochs,
              callbacks=[recorder])
    kw.update(trainer_kw)
    L.seed_everything(0)
    if isinstance(data, L.LightningDataModule):
        L.Trainer(**kw).fit(model, datamodule=data)
    else:
        val = DataLoader(Jittered(), batch_size=5)  # the same examples, never augmented
        L.Trainer(**kw).fit(model, train_dataloaders=DataLoader(data, batch_size=4, shuffle=True),
                            val_dataloaders=val)
    return model, recorder


def assert_same_training(a, b):
    (model_a, rec_a), (model_b, rec_b) = a, b
    for (name, p), q in zip(model_a.head.named_parameters(), model_b.head.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert rec_a.losses == pytest.approx(rec_b.losses, rel=1e-6, abs=1e-9) and len(rec_a.losses) > 0
    assert rec_a.val_losses == pytest.approx(rec_b.val_losses, rel=1e-6, abs=1e-9)


def oracle_data(tmp_path):
    images = ImageDataModule("digits", image_size=16, batch_size=8, val_fraction=0.01, test_fraction=0.01)
    return OracleDataModule(images, estimator="permutation_shapley", num_samples=8, test_size=4,
                            cache_dir=str(tmp_path / "labels"))


def test_cached_training_equals_uncached_and_runs_the_frozen_models_once_per_example(tmp_path, vit_weights):
    kw = dict(limit_train_batches=4, limit_val_batches=2)
    cached = fit(tmp_path, vit_weights[0], "memory", oracle_data(tmp_path), **kw)
    plain = fit(tmp_path, vit_weights[0], None, oracle_data(tmp_path), **kw)
    assert_same_training(cached, plain)
    assert len(plain[1].losses) == 12 and len(plain[1].val_losses) == 3
    rec, plain_rec = cached[1], plain[1]
    assert plain_rec.rows() == 3 * (4 * 8 + 2 * 8) and plain_rec.distinct() < plain_rec.rows()
    assert rec.backbone_rows == rec.game_rows == rec.distinct()  # train and val caches: once per example and split
    assert plain_rec.backbone_rows == plain_rec.game_rows == plain_rec.rows()
    assert len(cached[0].feature_caches["train"]) + len(cached[0].feature_caches["val"]) == rec.distinct()


def test_augmented_examples_bypass_the_cache_warn_once_and_train_the_same(tmp_path, vit_weights):
    jitter = set(range(1, N, 2))  # every odd example gets a new image at every access
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = fit(tmp_path, vit_weights[0], "memory", Jittered(jitter))
    plain = fit(tmp_path, vit_weights[0], None, Jittered(jitter))
    assert_same_training(cached, plain)
    assert len([w for w in caught if "FeatureCache bypassed" in str(w.message)]) == 1
    assert plain[1].backbone_rows == 3 * N + 3 * N  # train + val, every epoch
    assert cached[1].backbone_rows == N + 2 * len(jitter) + N  # even examples once, odd ones every epoch; val once
    assert cached[0].feature_caches["train"].bypassed == 2 * len(jitter)


def test_folder_cache_is_reused_by_the_next_fit_and_checked(tmp_path, vit_weights):
    folder = tmp_path / "features"
    first = fit(tmp_path, vit_weights[0], str(folder), Jittered(), epochs=2)
    key = first[0].feature_cache_key()
    assert sorted(f.name for f in folder.iterdir()) == [f"features-{key}-{split}-rank0.safetensors"
                                                         for split in ("train", "val")]
    assert first[1].backbone_rows == 2 * N
    second = fit(tmp_path, vit_weights[0], str(folder), Jittered(), epochs=2)
    assert second[1].backbone_rows == 0 and second[1].game_rows == 0
    assert_same_training(first, second)
    path = folder / f"features-{key}-train-rank0.safetensors"
    other = FeatureCache(key="0123456789ab")
    other.fetch(torch.arange(2), torch.randn(2, 3, 16, 16), lambda x: (torch.zeros(2, D, 16), torch.zeros(2, 2, K)))
    other.save(str(path))
    with pytest.raises(CorruptArtifactError, match=f"{path}.*written for feature_cache_key='0123456789ab'.*delete"):
        fit(tmp_path, vit_weights[0], str(folder), Jittered(), epochs=1)


def test_cache_stays_out_of_the_checkpoint(tmp_path, vit_weights):
    model, _ = fit(tmp_path, vit_weights[0], "memory", Jittered(), epochs=1)
    assert len(model.feature_caches["train"]) == len(model.feature_caches["val"]) == N
    path = str(tmp_path / "explainer.ckpt")
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": L.__version__}
    assert not [k for k in ckpt["state_dict"] if "cache" in k]
    del ckpt["hyper_parameters"]["feature_cache"]  # a checkpoint written before the option existed
    torch.save(ckpt, path)
    loaded = AmortizedExplainer.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.feature_cache == "memory" and len(loaded.feature_caches["train"]) == 0
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("bad", ["", "none", "Memory", 3, True])
def test_bad_feature_cache_is_named(vit_weights, bad):
    with pytest.raises(ValueError, match="`feature_cache`=.*'memory'.*None.*folder"):
        AmortizedExplainer(**explainer_kwargs(vit_weights[0], feature_cache=bad))


def test_feature_cache_that_is_a_file_is_named(tmp_path, vit_weights):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="`feature_cache`=.*file.txt.*not a folder"):
        AmortizedExplainer(**explainer_kwargs(vit_weights[0], feature_cache=str(path)))
