"""ValuationDataModule and ValuationModel: labels reused across epochs and runs, independent of batching and
processes, safe on disk; exact ground truth for tiny sets; 2-process DDP equals one process."""

import copy

import lightning as L
import numpy as np
import pytest
import torch

from lightning_attr import ValuationDataModule, ValuationModel
from lightning_attr.evaluation import value_scores
from lightning_attr.io import CorruptArtifactError, load_tensors
from lightning_attr.valuation import DatasetSource, SyntheticSource
from lightning_attr.valuation.estimators import exact_data_values


def source(n=48):
    return SyntheticSource(num_points=n, num_val=80, num_features=6, num_classes=3, flip_fraction=0.25, seed=3)


def datamodule(tmp_path, n=48, **kw):
    base = dict(estimator_options={"cardinality": [0, 6]}, num_samples=2, val_size=16, test_size=12,
                test_num_samples=20, cache_dir=str(tmp_path / "cache"), batch_size=8, chunk_size=16)
    base.update(kw)
    return ValuationDataModule(source(n), **base)


def trainer(tmp_path, **kw):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path), num_sanity_val_steps=0, enable_checkpointing=False)
    base.update(kw)
    return L.Trainer(**base)


def test_fixed_labels_are_reused_across_epochs_and_runs_and_independent_of_batching(tmp_path):
    dm = datamodule(tmp_path)
    everyone = torch.arange(48)
    first = dm.labels("train", everyone)
    spent = dm.evaluations
    assert spent == 48 * 2 * 2  # 2 samples per point, 2 fits per sample
    assert torch.equal(dm.labels("train", everyone, epoch=3), first) and dm.evaluations == spent
    again = datamodule(tmp_path)  # a new run: read from the cache, nothing evaluated
    assert torch.equal(again.labels("train", torch.tensor([40, 2, 17])), first[[40, 2, 17]])
    assert again.evaluations == 0
    other = datamodule(tmp_path / "other", chunk_size=16)  # another cache, points asked in another order
    assert torch.equal(other.labels("train", everyone.flip(0)), first.flip(0))


def test_fresh_and_running_mean_labels(tmp_path):
    fresh = datamodule(tmp_path, label_mode="fresh", cache_dir=None)
    idx = torch.arange(10)
    e0, e1 = fresh.labels("train", idx, epoch=0), fresh.labels("train", idx, epoch=1)
    assert not torch.equal(e0, e1)
    running = datamodule(tmp_path, label_mode="running_mean", cache_dir=None)
    r0, r1 = running.labels("train", idx, epoch=0), running.labels("train", idx, epoch=1)
    assert torch.equal(r0, e0) and torch.allclose(r1, (e0 + e1) / 2)


def test_truncated_cache_is_detected_and_a_crash_keeps_finished_labels(tmp_path, monkeypatch):
    dm = datamodule(tmp_path)
    dm.labels("train", torch.arange(16))  # the first chunk, saved
    file = next((tmp_path / "cache").glob("train-*-rank0.safetensors"))
    assert len(load_tensors(str(file))[0]["index"]) == 16
    crashing = datamodule(tmp_path)
    crashing.setup()
    monkeypatch.setattr(crashing.oracle, "draw", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        crashing.labels("train", torch.arange(48))
    survivor = datamodule(tmp_path)
    assert torch.equal(survivor.labels("train", torch.arange(16)), dm.labels("train", torch.arange(16)))
    assert survivor.evaluations == 0
    file.write_bytes(file.read_bytes()[:-20])
    with pytest.raises(CorruptArtifactError, match=file.name):
        datamodule(tmp_path).labels("train", torch.arange(4))


def test_tiny_sets_get_exact_ground_truth(tmp_path):
    dm = datamodule(tmp_path, n=10, estimator_options={"cardinality": [1, 4]}, test_size=10)
    dm.setup()
    exact = exact_data_values(dm.oracle.utility, (1, 4))["distributional_shapley"]
    assert torch.allclose(dm.labels("test", torch.arange(10)).double(), exact, atol=1e-6)


def test_model_starts_at_zero_and_test_metrics_equal_the_functional_scores(tmp_path):
    dm = datamodule(tmp_path)
    model = ValuationModel(hidden=16, depth=1)
    trainer(tmp_path, max_epochs=2).fit(model, dm)
    assert model.scale > 0
    fresh = ValuationModel(num_features=6, num_classes=3, hidden=16, depth=1)
    assert torch.equal(fresh(torch.randn(4, 6)), torch.zeros(4, 3))
    got = trainer(tmp_path).test(model, dm, verbose=False)[0]
    test = dm.splits["test"]
    with torch.no_grad():
        preds = model.value(dm.data.inputs[test], dm.data.y_train[test])
    want = value_scores(preds, dm.labels("test", test), dm.data.flipped[test])
    for key, value in want.items():
        assert got[f"test/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Labels made under 2-process DDP equal one process's; DDP test metrics equal the single-process ones.

    ``ddp_spawn``: under ``ddp_fork`` the children hang in their first parallel matmul of the batched fits (OpenMP's
    thread pool does not survive a fork once the parent has used it)."""
    model = ValuationModel(num_features=6, num_classes=3, hidden=16, depth=1)
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    twin = copy.deepcopy(model)
    ddp_dm = datamodule(tmp_path / "ddp")
    trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ddp_dm)
    files = sorted((tmp_path / "ddp" / "cache").glob("train-*-rank*.safetensors"))
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["rank0.safetensors", "rank1.safetensors"]
    from_ddp = datamodule(tmp_path / "ddp").labels("train", torch.arange(48))
    assert torch.equal(from_ddp, datamodule(tmp_path / "single").labels("train", torch.arange(48)))
    single = trainer(tmp_path).test(model, datamodule(tmp_path / "single"), verbose=False)[0]
    ddp = trainer(tmp_path, devices=2, strategy="ddp_spawn").test(twin, datamodule(tmp_path / "ddp"), verbose=False)[0]
    assert set(single) == set(ddp) and "test/mislabeled_auroc" in single
    for key in single:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key


def test_dataset_source_reads_columns_and_refuses_bad_ones(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    table = {"a": rng.normal(size=60).tolist(), "b": rng.normal(size=60).tolist(),
             "label": rng.integers(0, 2, 60).tolist()}
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "ds"))
    data = DatasetSource(str(tmp_path / "ds"), ["a", "b"], num_train=40).load()
    assert data.x_train.shape == (40, 2) and data.x_val.shape == (20, 2) and not data.flipped.any()
    with pytest.raises(ValueError, match="no column"):
        DatasetSource(str(tmp_path / "ds"), ["a", "c"], label_column="target").load()
    with pytest.raises(ValueError, match="num_train"):
        DatasetSource(str(tmp_path / "ds"), ["a"], num_train=60).load()


def test_datamodule_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="label_mode"):
        datamodule(tmp_path, label_mode="stale")
    with pytest.raises(ValueError, match="num_samples"):
        datamodule(tmp_path, num_samples=0)
    with pytest.raises(ValueError, match="cardinality"):
        datamodule(tmp_path, estimator_options={"cardinality": [0, 48]}).labels("train", torch.arange(2))
    with pytest.raises(ValueError, match="allowed"):
        datamodule(tmp_path, estimator="tmc").labels("train", torch.arange(2))


def test_offline_wandb_run_gets_the_test_metrics_and_values_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="lightning-attr-test", save_dir=str(tmp_path), offline=True)
    dm, model = datamodule(tmp_path), ValuationModel(hidden=8, depth=1)
    run = trainer(tmp_path, logger=logger, max_epochs=1)
    run.fit(model, dm)
    run.test(model, dm, verbose=False)
    logger.experiment.finish()
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/test/values_*.table.json"))
    assert len(tables) == 1
    import json

    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["index", "value", "ground_truth", "flipped"] and len(table["data"]) == 12


def test_image_points_through_a_frozen_timm_backbone(tmp_path, vit_weights):
    from conftest import TINY_VIT

    from lightning_attr.valuation import DigitsSource

    dm = ValuationDataModule(DigitsSource(num_train=40, image_size=16), estimator_options={"cardinality": [0, 4]},
                             num_samples=1, val_size=8, test_size=4, test_num_samples=2,
                             cache_dir=str(tmp_path / "cache"), batch_size=8)
    model = ValuationModel(num_classes=10, backbone="vit_tiny_patch16_224", backbone_weights=vit_weights[0],
                           backbone_kwargs={**TINY_VIT, "in_chans": 1}, hidden=8, depth=1)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer(tmp_path, max_epochs=1).fit(model, dm)
    assert dm.data.inputs.shape == (40, 1, 16, 16)
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())  # frozen
    assert model(dm.data.inputs[:3]).shape == (3, 10) and model.head[-1].weight.abs().sum() > 0
