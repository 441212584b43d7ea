"""OracleDataModule: label modes, the on-disk cache, independent validation labels and exact test values."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import explainer_kwargs

from lightning_attr import AmortizedExplainer, ImageDataModule, OracleDataModule
from lightning_attr.data import LabelStore
from lightning_attr.estimators import exact_shapley, permutation_shapley


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


def fit(tmp_path, weights, epochs=2, **data_kw):
    images = ImageDataModule("digits", image_size=16, batch_size=64, val_fraction=0.02, test_fraction=0.005)
    kw = dict(estimator="permutation_shapley", num_samples=8, test_size=5, cache_dir=str(tmp_path / "cache"))
    kw.update(data_kw)
    dm = OracleDataModule(images, **kw)
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


def test_fixed_labels_are_the_estimator_on_the_game(tmp_path, vit_weights):
    dm, model, rec, _ = fit(tmp_path, vit_weights[0], epochs=1, label_mode="fixed")
    images = dm.datamodule.splits["train"]
    epoch, idx, labels = rec.train[0]
    x = torch.stack([images[int(i)]["image"] for i in idx])
    exact = exact_shapley(model.game, x)
    # Unbiased noisy labels: efficient on every example and correlated with the exact values.
    torch.testing.assert_close(labels.sum(1), exact.sum(1), atol=1e-5, rtol=1e-4)
    assert torch.corrcoef(torch.stack([labels.flatten(), exact.flatten()]))[0, 1] > 0.5


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


def test_bad_arguments_are_named():
    images = ImageDataModule("digits", image_size=16)
    with pytest.raises(ValueError, match="estimator"):
        OracleDataModule(images, estimator="magic")
    with pytest.raises(ValueError, match="label_mode"):
        OracleDataModule(images, label_mode="sometimes")
    with pytest.raises(ValueError, match="num_samples"):
        OracleDataModule(images, num_samples=0)
