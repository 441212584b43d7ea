"""AttributionHeatmaps writes PNGs and logs them to W&B (offline run on disk, no network)."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from conftest import explainer_kwargs

from lightning_attr import AmortizedExplainer, ImageDataModule, OracleDataModule
from lightning_attr.callbacks import AttributionHeatmaps
from lightning_attr.plots import attribution_heatmaps


def test_heatmap_png_is_written_atomically(tmp_path):
    x = torch.randn(3, 3, 16, 16)
    path = attribution_heatmaps(x, {"a": torch.randn(3, 4, 10), "b": torch.randn(3, 4, 10)}, torch.tensor([0, 1, 2]),
                                (2, 2), str(tmp_path / "h.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]


def test_callback_logs_images_to_an_offline_wandb_run(tmp_path, vit_weights, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="lightning-attr-test", save_dir=str(tmp_path), offline=True)
    images = ImageDataModule("digits", image_size=16, batch_size=16, val_fraction=0.02, test_fraction=0.01)
    dm = OracleDataModule(images, estimator="permutation_shapley", num_samples=8, test_size=2,
                          cache_dir=str(tmp_path / "cache"))
    callback = AttributionHeatmaps(num_images=3, every_n_epochs=1, dirpath=str(tmp_path / "png"))
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=logger, callbacks=[callback],
                        enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=1)
    trainer.fit(AmortizedExplainer(**explainer_kwargs(vit_weights[0])), dm)
    run_dir = logger.experiment.dir
    logger.experiment.finish()
    assert [p.split("/")[-1] for p in callback.paths] == ["epoch=000.png", "epoch=001.png"]  # none in sanity check
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/**/*.png"))
    assert len(media) == 2, (run_dir, media)


def fit(tmp_path, weights, callback, epochs=1):
    images = ImageDataModule("digits", image_size=16, batch_size=16, val_fraction=0.02, test_fraction=0.01)
    dm = OracleDataModule(images, estimator="permutation_shapley", num_samples=8, test_size=2,
                          cache_dir=str(tmp_path / "cache"))
    model = AmortizedExplainer(**explainer_kwargs(weights))
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, logger=False,
                        callbacks=[callback], enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path / "root"))
    trainer.fit(model, dm)
    return model, dm


def test_default_folder_is_the_runs_own(tmp_path, vit_weights):
    """Without a logger, two runs in one root write into their own run folders, not over each other."""
    paths = []
    for _ in range(2):
        callback = AttributionHeatmaps(num_images=2, every_n_epochs=1)
        fit(tmp_path, vit_weights[0], callback)
        paths += callback.paths
    runs = tmp_path / "root" / "lightning_attr_runs"
    assert paths == [str(runs / f"version_{v}" / "heatmaps" / "epoch=000.png") for v in (0, 1)]
    assert all(os.path.isfile(p) for p in paths)


def test_run_shorter_than_the_interval_draws_its_last_epoch(tmp_path, vit_weights):
    callback = AttributionHeatmaps(num_images=2, every_n_epochs=5, dirpath=str(tmp_path / "png"))
    fit(tmp_path, vit_weights[0], callback, epochs=2)
    assert [os.path.basename(p) for p in callback.paths] == ["epoch=001.png"]
    assert os.path.isfile(callback.paths[0])


def test_titles_name_the_predicted_class(tmp_path, vit_weights, monkeypatch):
    calls = []

    def record(images, attributions, classes, grid, path, **kw):
        calls.append((images, classes, kw.get("titles")))
        return path

    monkeypatch.setattr("lightning_attr.callbacks.heatmaps.attribution_heatmaps", record)
    model, _ = fit(tmp_path, vit_weights[0], AttributionHeatmaps(num_images=3, every_n_epochs=1))
    (images, classes, titles), = calls
    v_all = model.game(images, torch.ones(3, 1, model.game.num_players, dtype=torch.bool))[:, 0]
    assert classes.tolist() == v_all.argmax(-1).tolist()
    assert titles == [f"pred {c}" for c in v_all.argmax(-1).tolist()]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_images"):
        AttributionHeatmaps(num_images=0)
    with pytest.raises(ValueError, match="every_n_epochs"):
        AttributionHeatmaps(every_n_epochs=0)
