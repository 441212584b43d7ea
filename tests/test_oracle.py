"""OracleDataModule: label modes, the on-disk cache, independent validation labels and exact test values."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from conftest import TINY_VIT, explainer_kwargs

from lightning_attr import AmortizedExplainer, ImageDataModule, OracleDataModule, PatchGame
from lightning_attr.data import LabelStore
from lightning_attr.data.label_store import StaleLabelsError, content_signature
from lightning_attr.data.oracle import game_fingerprint
from lightning_attr.estimators import exact_shapley, permutation_shapley
from lightning_attr.io import CorruptArtifactError


class Recorder(L.Callback):
    """Keeps (epoch, index, labels) of every training batch and the validation / test batches."""

    def __init__(self) -> None:
        self.train, self.val, self.test = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.train.append((trainer.current_epoch, batch["index"].clone(), batch["labels"].clone()))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val.append((batch["index"].clone(), batch["labels"].clone()))

    def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.test.append((batch["image"].clone(), batch["exact"].clone()))


def fit(tmp_path, weights, epochs=2, images_kw=None, dm=None, **data_kw):
    images = ImageDataModule("digits", **{**dict(image_size=16, batch_size=64, val_fraction=0.02, test_fraction=0.005),
                                          **(images_kw or {})})
    kw = dict(estimator="permutation_shapley", num_samples=8, test_size=5, cache_dir=str(tmp_path / "cache"))
    kw.update(data_kw)
    dm = dm or OracleDataModule(images, **kw)
    model = AmortizedExplainer(**explainer_kwargs(weights))
    rec = Recorder()
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[rec])
    trainer.fit(model, dm)
    return dm, model, rec, trainer


def by_index(records):
    return {int(i): lab for _, idx, labels in records for i, lab in zip(idx, labels)}


def test_fixed_labels_are_reused_across_epochs_and_runs(tmp_path, vit_weights):
    dm, model, rec, _ = fit(tmp_path, vit_weights[0], epochs=3, label_mode="fixed")
    seen: dict[int, torch.Tensor] = {}
    repeats = 0
    for _, idx, labels in rec.train:
        for i, lab in zip(idx.tolist(), labels):
            if i in seen:
                repeats += 1
                torch.testing.assert_close(lab, seen[i], rtol=0, atol=0)
            seen[i] = lab
    assert repeats > 0
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    # A second run reads the cache: the same labels, and no train-label evaluations for cached examples.
    dm2, _, rec2, _ = fit(tmp_path, vit_weights[0], epochs=1, label_mode="fixed")
    for i, lab in by_index(rec2.train).items():
        if i in seen:
            torch.testing.assert_close(lab, seen[i], rtol=0, atol=0)
    cached = sum(1 for i in by_index(rec2.train) if i in seen)
    assert dm2.evaluations["train"] == (len(by_index(rec2.train)) - cached) * 8


def assert_labels_fit_the_served_images(dm, model, rec):
    """Every served train label is the estimator's on *this* split's image: efficient against the exact values."""
    images = dm.datamodule.splits["train"]
    for _, idx, labels in rec.train:
        x = torch.stack([images[int(i)]["image"] for i in idx])
        torch.testing.assert_close(labels.sum(1), exact_shapley(model.game, x).sum(1), atol=1e-5, rtol=1e-4)


def test_fixed_labels_are_the_estimator_on_the_game(tmp_path, vit_weights):
    dm, model, rec, _ = fit(tmp_path, vit_weights[0], epochs=1, label_mode="fixed")
    images = dm.datamodule.splits["train"]
    epoch, idx, labels = rec.train[0]
    x = torch.stack([images[int(i)]["image"] for i in idx])
    exact = exact_shapley(model.game, x)
    # Unbiased noisy labels: efficient on every example and correlated with the exact values.
    torch.testing.assert_close(labels.sum(1), exact.sum(1), atol=1e-5, rtol=1e-4)
    assert torch.corrcoef(torch.stack([labels.flatten(), exact.flatten()]))[0, 1] > 0.5


@pytest.mark.parametrize("change", [dict(seed=1), dict(mean=0.4)], ids=["split_seed", "mean"])
def test_cache_is_keyed_by_the_split_and_preprocessing(tmp_path, vit_weights, change):
    """Another split (same length) or another normalization sharing the cache dir gets its own labels."""
    fit(tmp_path, vit_weights[0], epochs=1, label_mode="fixed")
    dm, model, rec, _ = fit(tmp_path, vit_weights[0], epochs=1, images_kw=change, label_mode="fixed")
    assert_labels_fit_the_served_images(dm, model, rec)
    assert dm.evaluations["train"] == 2 * 64 * 8  # nothing served from the first run's cache
    assert len(list((tmp_path / "cache").glob("train-*-rank0.safetensors"))) == 2


@pytest.mark.parametrize("cache_dir", [None, "cache"])
def test_a_reused_datamodule_labels_for_the_new_game(tmp_path, vit_weights, cache_dir):
    """One OracleDataModule, two explained models in turn: the second gets its own game's labels."""
    from lightning_attr import create_timm_model
    from lightning_attr.modules import save_timm_weights

    dm, _, _, _ = fit(tmp_path, vit_weights[0], epochs=1, label_mode="fixed",
                      cache_dir=cache_dir and str(tmp_path / cache_dir))
    torch.manual_seed(1)
    other = str(tmp_path / "other.safetensors")
    save_timm_weights(create_timm_model("vit_tiny_patch16_224", num_classes=10, **TINY_VIT), other)
    dm, model, rec, _ = fit(tmp_path, other, epochs=1, dm=dm)
    assert_labels_fit_the_served_images(dm, model, rec)


def test_labels_of_other_images_under_the_same_key_are_refused(tmp_path, vit_weights, monkeypatch):
    """The read check: with a data fingerprint that misses the change, the stored image signatures catch it."""
    monkeypatch.setattr("lightning_attr.data.oracle.dataset_fingerprint", lambda dataset: "blind")
    fit(tmp_path, vit_weights[0], epochs=1, label_mode="fixed")
    with pytest.raises(StaleLabelsError, match=r"cache.*train-.*rank\*\.safetensors.*delete"):
        fit(tmp_path, vit_weights[0], epochs=1, images_kw=dict(mean=0.45), label_mode="fixed")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_cache_file_is_an_error_naming_it(tmp_path, vit_weights, damage):
    fit(tmp_path, vit_weights[0], epochs=1, label_mode="fixed")
    (path,) = (tmp_path / "cache").glob("train-*-rank0.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        mid = len(data) // 2
        data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=f"{path.name}.*delete"):
        fit(tmp_path, vit_weights[0], epochs=1, label_mode="fixed")


def test_label_store_refuses_labels_of_other_inputs(tmp_path):
    x = torch.randn(3, 3, 16, 16)
    store = LabelStore(5, str(tmp_path / "c"))
    store.put(torch.tensor([0, 1, 2]), torch.ones(3, 4, 2), content_signature(x))
    store.save()
    again = LabelStore(5, str(tmp_path / "c"))
    again.check(torch.tensor([0, 1, 2, 3]), content_signature(torch.cat([x, x[:1]])))  # same images: fine
    y = x.clone()
    y[1, 0, 0, 0] += 1 / 255  # one pixel, one grey level
    with pytest.raises(StaleLabelsError, match=r"c-rank\*\.safetensors.*indices \[1\]"):
        again.check(torch.tensor([0, 1, 2]), content_signature(y))
    again.check(torch.tensor([0, 1, 2]), content_signature(x.bfloat16().float()), torch.bfloat16)  # rounding only


def test_game_fingerprint_sees_the_baseline(vit_weights):
    model = vit_weights[1]
    fingerprints = {game_fingerprint(PatchGame(model, 8, (16, 16), baseline=b)) for b in (0.0, 0.0, 0.5)}
    assert len(fingerprints) == 2


def test_fresh_labels_change_every_epoch(tmp_path, vit_weights):
    _, _, rec, _ = fit(tmp_path, vit_weights[0], epochs=2, label_mode="fresh")
    first = {int(i): lab for e, idx, labels in rec.train if e == 0 for i, lab in zip(idx, labels)}
    second = {int(i): lab for e, idx, labels in rec.train if e == 1 for i, lab in zip(idx, labels)}
    common = set(first) & set(second)
    assert common and all(not torch.equal(first[i], second[i]) for i in common)


def test_running_mean_is_the_mean_of_the_draws(tmp_path, vit_weights):
    dm, model, rec, _ = fit(tmp_path, vit_weights[0], epochs=3, label_mode="running_mean")
    store = dm.stores["train-running_mean"]
    appearances = torch.zeros_like(store.count)
    last = {}
    for _, idx, labels in rec.train:
        appearances[idx] += 1
        last.update({i: lab for i, lab in zip(idx.tolist(), labels)})
    assert int(appearances.max()) >= 2
    torch.testing.assert_close(store.count, appearances)  # one draw per appearance
    for i, lab in last.items():  # the label handed out is the mean so far
        torch.testing.assert_close(lab, store.values[i])
    assert set(dm.state_dict()) == {"train-running_mean"}


def test_label_store_running_mean_and_cache_merge(tmp_path):
    draws = torch.randn(5, 3, 4, 2)
    store = LabelStore(6)
    index = torch.tensor([0, 2, 5])
    for k in range(5):
        out = store.update_mean(index, draws[k])
        torch.testing.assert_close(out, draws[: k + 1].mean(0))
    # Two ranks write their own files; a reader with any world size merges them by index.
    a = LabelStore(6, str(tmp_path / "c"), rank=0)
    a.put(torch.tensor([0, 1]), torch.ones(2, 4, 2))
    a.save()
    b = LabelStore(6, str(tmp_path / "c"), rank=1)
    b.put(torch.tensor([4]), 2 * torch.ones(1, 4, 2))
    b.save()
    merged = LabelStore(6, str(tmp_path / "c"))
    assert merged.has(torch.arange(6)).tolist() == [True, True, False, False, True, False]
    torch.testing.assert_close(merged.get(torch.tensor([1, 4]))[:, 0, 0], torch.tensor([1.0, 2.0]))


def test_validation_labels_are_independent_draws(tmp_path, vit_weights):
    dm, model, rec, _ = fit(tmp_path, vit_weights[0], epochs=2, label_mode="fixed")
    val = dm.datamodule.splits["val"]
    idx, labels = rec.val[0]
    x = torch.stack([val[int(i)]["image"] for i in idx])
    same_seed_train = permutation_shapley(model.game, x, 8, generator=dm._generator("train", 0, idx))
    assert not torch.allclose(labels, same_seed_train)
    # Fixed across validation epochs.
    later = [lab for i, lab in rec.val if torch.equal(i, idx)]
    assert len(later) >= 2 and all(torch.equal(later[0], lab) for lab in later)


def test_test_batches_carry_exact_values(tmp_path, vit_weights):
    dm, model, rec, trainer = fit(tmp_path, vit_weights[0], epochs=1)
    trainer.test(model, dm, verbose=False)
    x = torch.cat([x for x, _ in rec.test])
    exact = torch.cat([e for _, e in rec.test])
    assert x.shape[0] == 5
    torch.testing.assert_close(exact, exact_shapley(model.game, x), atol=1e-6, rtol=1e-5)
    images, again = dm.ground_truth(model.game, "cpu")
    torch.testing.assert_close(again, exact)


def test_exact_enumeration_announces_itself_and_shows_progress(tmp_path, vit_weights, capsys, caplog):
    dm, model, _, trainer = fit(tmp_path, vit_weights[0], epochs=1)
    with caplog.at_level(logging.INFO):
        trainer.test(model, dm, verbose=False)
    assert any("enumerating 2^4 = 16 coalitions per image" in r.getMessage() for r in caplog.records)
    assert "exact shapley: 2^4 = 16 coalitions per image" in capsys.readouterr().err
    assert dm._progress is None  # closed at teardown


def test_bad_arguments_are_named():
    images = ImageDataModule("digits", image_size=16)
    with pytest.raises(ValueError, match="estimator"):
        OracleDataModule(images, estimator="magic")
    with pytest.raises(ValueError, match="label_mode"):
        OracleDataModule(images, label_mode="sometimes")
    with pytest.raises(ValueError, match="num_samples"):
        OracleDataModule(images, num_samples=0)
